"""Adding image files to a bundle's items: read, hash and preprocess them a batch at a time
(the next batch decoded while the current one is embedded), embed, and store them with the
bundle's database-side augmentation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.bundle.records import (
    MAX_LABEL,  # the longest label an item may have
    ItemRecord,
)
from retrieval.data.images import ImageLoadError
from retrieval.search.prefetch import chunks, prefetched

if TYPE_CHECKING:
    from retrieval.backends.base import SearchBackend
    from retrieval.bundle.runtime import Runtime
    from retrieval.data.preprocessing import Preprocessing
    from retrieval.postprocess import DBA

__all__ = ["MAX_LABEL", "LoadedFiles", "add_files", "load_files"]


@dataclass
class AddReport:
    """What :meth:`Retriever.add <retrieval.search.retriever.Retriever.add>` did: ids of new
    items, duplicates of items already in the bundle (``(path, existing id)``) and files that
    could not be read (``(path, reason)``)."""

    added: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class LoadedFiles:
    """One batch of files read for :func:`add_files`."""

    count: int
    pixels: list[np.ndarray] = field(default_factory=list)
    records: list[ItemRecord] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def load_files(
    batch: Sequence[tuple[Any, str | None]], preprocessing: Preprocessing, max_pixels: int
) -> LoadedFiles:
    """Read, hash and preprocess one batch of ``(path, label)``; a file that cannot be read
    or decoded, or a path or label the store would refuse, is listed as unreadable."""
    loaded = LoadedFiles(count=len(batch))
    for path, lab in batch:
        name = str(Path(path).resolve())
        try:
            ItemRecord(uri=name, label=lab)  # a path or label the store would refuse
            data = Path(path).read_bytes()
            loaded.pixels.append(preprocessing.prepare(data, max_pixels, name=name))
        except (OSError, ImageLoadError, ValueError) as err:
            loaded.unreadable.append((name, str(err)))
            continue
        digest = hashlib.sha256(data).hexdigest()
        loaded.records.append(ItemRecord(uri=name, label=lab, content_sha256=digest))
    return loaded


def add_files(
    items: SearchBackend,
    runtime: Runtime,
    preprocessing: Preprocessing,
    max_pixels: int,
    dba: DBA | None,
    paths: Sequence[str | os.PathLike[str]],
    labels: Sequence[str | None] | None = None,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> AddReport:
    """Embed and add image files to ``items`` (see :meth:`Retriever.add
    <retrieval.search.retriever.Retriever.add>`): preprocessed by ``preprocessing`` under
    ``max_pixels``, embedded by ``runtime``, augmented with ``dba`` when given."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
    items.check_writable()  # before any image is embedded
    report = AddReport()
    pairs = list(zip(paths, labels or [None] * len(paths), strict=True))
    load = partial(load_files, preprocessing=preprocessing, max_pixels=max_pixels)
    for loaded in prefetched(chunks(pairs, batch_size), load):
        report.unreadable += loaded.unreadable
        if loaded.records:
            vectors = runtime.embed_many(loaded.pixels)
            result = items.add(
                loaded.records, vectors, dba=None if dba is None else (dba.k, dba.alpha)
            )
            report.added += result.added
            report.duplicates += [
                (loaded.records[pos].uri, existing) for pos, existing in result.duplicates
            ]
        if progress is not None:
            progress(loaded.count)
    return report

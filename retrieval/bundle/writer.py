"""Writing a bundle: everything in a hidden temporary folder beside the target, the manifest last,
then one rename. An interrupted export leaves no folder that loads; the folders a killed one
left (see :func:`~retrieval.bundle.format.stale_exports`) are removed, with a warning, by the
next export to the same target. Galleries larger than memory are streamed in chunks
(:func:`write_bundle_chunks`)."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.bundle.format import (
    BACKGROUND,
    BundleError,
    stale_exports,
    write_manifest,
)
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.model_export import export_model
from retrieval.bundle.records import ItemRecord
from retrieval.data.preprocessing import Preprocessing
from retrieval.infra.io import atomic_write, package_versions
from retrieval.infra.locks import folder_lock
from retrieval.models import Embedder

__all__ = [
    "GalleryItem",
    "remove_stale_exports",
    "write_bundle",
    "write_bundle_chunks",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GalleryItem:
    """What the bundle stores about one gallery image besides its vector."""

    uri: str
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    content_sha256: str | None = None


def write_bundle(
    output: Path,
    embedder: Embedder,
    model_config: dict[str, Any],
    preprocessing: Preprocessing,
    items: list[GalleryItem],
    vectors: np.ndarray,
    factory: str = "Flat",
    search_params: str = "",
    description: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle at ``output`` (layout in :mod:`retrieval.bundle.format`).

    Args:
        embedder: the model; exported as safetensors, TorchScript and ONNX.
        model_config: the ``backbone`` and ``embedder`` fields of ``model.json`` that rebuild
            it (:func:`~retrieval.bundle.model_config.model_architecture`); the export
            fills in the rest (:func:`~retrieval.bundle.model_config.model_config_for`).
        preprocessing: what the model expects (``preprocessing.json``).
        items: one per row of ``vectors``.
        vectors: (n, dim) float32 L2-normalised embeddings of the items.
        factory, search_params: the FAISS index (trained on ``vectors`` when it needs it).
        description: extra manifest fields (metrics, protocol, gallery source).
        overwrite: replace a bundle already at ``output``.

    Raises:
        BundleError: ``output`` exists and ``overwrite`` is false, or is not a bundle folder.
        ValueError: items and vectors disagree.
    """
    if len(items) != len(vectors):
        raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
    return write_bundle_chunks(
        output,
        embedder,
        model_config,
        preprocessing,
        [(items, vectors)],
        int(vectors.shape[1]),
        train_vectors=vectors,
        factory=factory,
        search_params=search_params,
        description=description,
        overwrite=overwrite,
    )


def remove_stale_exports(target: Path) -> list[Path]:
    """Remove the folders interrupted exports to ``target`` left beside it (those
    :func:`~retrieval.bundle.format.stale_exports` finds), logging a warning naming them;
    return them."""
    removed = []
    for folder in stale_exports(target):
        with folder_lock(folder) as free:  # not taken meanwhile by a running export
            if free:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        log.warning(
            "removed %d folder(s) left by interrupted exports to %s: %s",
            len(removed),
            target,
            ", ".join(p.name for p in removed),
        )
    return removed


def write_bundle_chunks(
    output: Path,
    embedder: Embedder,
    model_config: dict[str, Any],
    preprocessing: Preprocessing,
    chunks: Iterable[tuple[Sequence[GalleryItem], np.ndarray] | tuple[Any, ...]],
    dim: int,
    train_vectors: np.ndarray | None = None,
    max_train: int = 100_000,
    factory: str = "Flat",
    search_params: str = "",
    description: dict[str, Any] | None = None,
    overwrite: bool = False,
    background: np.ndarray | None = None,
) -> Path:
    """:func:`write_bundle` for galleries larger than memory: the items arrive in ``chunks``
    (``(items, vectors)`` with vectors (len(items), dim)), each stored (one SQLite
    transaction) and indexed before the next is read; one index snapshot at the end. A chunk
    ``(items, vectors, base_vectors)`` also stores the un-augmented vectors of a gallery
    augmented by DBA (see :meth:`~retrieval.bundle.item_table.ItemTable.add`).

    Args:
        train_vectors: (m, dim) sample to train IVF / PQ indexes on (at most ``max_train``
            of its rows are used); unused by indexes that need no training.
        background: (n, dim) vectors of ``postprocess.score_norm``, in the searched space
            (after the model's whitening), stored as ``score_norm_background.npy``.

    Raises:
        as :func:`write_bundle`; ValueError also for a chunk whose lengths disagree.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise BundleError(f"{output} exists: pass overwrite=true (export.py overwrite=true)")
    if output.exists() and not (output / "manifest.json").is_file():
        raise BundleError(f"{output} exists and is not a bundle: refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(output)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    with folder_lock(tmp, wait=True):  # marks it in use until the export ends
        _write_into(
            tmp,
            output,
            embedder,
            model_config,
            preprocessing,
            chunks,
            dim,
            train_vectors,
            max_train,
            factory,
            search_params,
            description,
            background,
        )
    return output


def _write_into(
    tmp: Path,
    output: Path,
    embedder: Embedder,
    model_config: dict[str, Any],
    preprocessing: Preprocessing,
    chunks: Iterable[tuple[Sequence[GalleryItem], np.ndarray] | tuple[Any, ...]],
    dim: int,
    train_vectors: np.ndarray | None,
    max_train: int,
    factory: str,
    search_params: str,
    description: dict[str, Any] | None,
    background: np.ndarray | None,
) -> None:
    """The body of :func:`write_bundle_chunks`: fill ``tmp``, then put it at ``output``."""
    try:
        pre = preprocessing
        any_size = pre.any_size
        files = list(
            export_model(embedder, tmp, model_config, pre.input_size, any_size=any_size).values()
        )
        with atomic_write(tmp / "preprocessing.json", "w", encoding="utf-8") as handle:
            json.dump(pre.to_json(), handle, indent=2)
        files.append("preprocessing.json")
        if background is not None:
            np.save(tmp / BACKGROUND, np.ascontiguousarray(background, dtype=np.float32))
            files.append(BACKGROUND)
        count = _fill_items(tmp, chunks, dim, factory, search_params, train_vectors, max_train)
        manifest = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "embedding_dim": dim,
            "metric": "inner_product",
            "normalized": True,
            "index": {"factory": factory, "search_params": search_params},
            "items": count,
            "versions": package_versions(
                ("retrieval", "torch", "timm", "faiss-cpu", "onnxruntime", "numpy")
            ),
        }
        write_manifest(tmp, {**manifest, **(description or {})}, files)
        if output.exists():
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            with folder_lock(output, wait=True):  # the lock moves with the folder
                output.rename(old)
                tmp.rename(output)
                shutil.rmtree(old)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fill_items(
    folder: Path,
    chunks: Iterable[tuple[Sequence[GalleryItem], np.ndarray] | tuple[Any, ...]],
    dim: int,
    factory: str,
    search_params: str,
    train_vectors: np.ndarray | None,
    max_train: int,
) -> int:
    """Create the items of ``folder`` (table and index) from ``chunks`` and close them (one
    snapshot); returns how many items there are (the same content_sha256 is stored once)."""
    state = IndexedItems.create(
        folder,
        dim,
        factory,
        search_params,
        train_vectors=train_vectors,
        snapshot_every=None,  # one snapshot, at close
        max_train=max_train,
    )
    try:
        for items, vectors, *base in chunks:
            if len(items) != len(vectors):
                raise ValueError(f"a chunk has {len(items)} items but {len(vectors)} vectors")
            records = [ItemRecord(i.uri, i.label, i.extra, i.content_sha256) for i in items]
            state.add(records, vectors, base_vectors=base[0] if base else None)
    except BaseException:
        with contextlib.suppress(Exception):  # release the folder; the error is the news
            state.close()
        raise
    count = state.ntotal
    state.close()  # writes the index snapshot
    return count

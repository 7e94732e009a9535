"""A gallery as a bundle indexes it: ``(items, vectors)`` chunks for
:func:`~retrieval.bundle.writer.write_bundle_chunks`, from embedded images (one chunk) or
streamed from the shards ``embed.py`` wrote, through the vector steps the bundle's gallery
holds (the whitening; DBA's augmented vectors, the plain ones beside them)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.bundle.writer import GalleryItem
from retrieval.data.manifest import ManifestRow
from retrieval.index.shards import ShardSet, training_sample
from retrieval.infra.io import sha256_file
from retrieval.postprocess import DBA, Whitening, database_augment

Chunk = tuple[Sequence[GalleryItem], np.ndarray] | tuple[Any, ...]


@dataclass
class Gallery:
    """What a bundle indexes: ``chunks`` (``(items, vectors)``, or ``(items, vectors,
    base_vectors)`` with DBA), ``train_vectors`` (a sample IVF / PQ indexes train on), the
    vectors' ``dim`` and ``description`` (the manifest's ``gallery`` entry)."""

    chunks: Iterable[Chunk]
    train_vectors: np.ndarray
    dim: int
    description: dict[str, Any]

    @property
    def items(self) -> list[GalleryItem] | None:
        """The items, when they are held in memory (one chunk); None when streamed."""
        return list(self.chunks[0][0]) if isinstance(self.chunks, list) else None


def image_gallery(
    source: str,
    rows: Sequence[ManifestRow],
    vectors: np.ndarray,
    whitening: Whitening | None = None,
    dba: DBA | None = None,
) -> Gallery:
    """The images ``rows``, embedded as ``vectors`` (one row each), as one chunk: their
    files' paths, labels, extra fields and content hashes, the vectors whitened by
    ``whitening`` when given, then augmented by ``dba`` (the augmented vectors searched, the
    plain ones kept beside them). ``source`` names the gallery in the manifest."""
    items = [
        GalleryItem(
            uri=str(row.path.resolve()),
            label=row.label or None,
            extra=dict(row.extra),
            content_sha256=sha256_file(row.path),
        )
        for row in rows
    ]
    vectors = np.ascontiguousarray(vectors)
    if whitening is not None:
        vectors = whitening.apply(vectors)
    chunk: Chunk = (items, vectors)
    if dba is not None:
        chunk = (items, database_augment(vectors, dba.k, dba.alpha), vectors)
    # IVF / PQ train on the vectors they will hold (augmented, with DBA)
    return Gallery([chunk], chunk[1], int(vectors.shape[1]), {"source": source})


def shard_gallery(
    shards: ShardSet, chunk_rows: int, max_train: int, whitening: Whitening | None = None
) -> Gallery:
    """The gallery of ``shards``, streamed from disk ``chunk_rows`` vectors at a time, each
    chunk whitened by ``whitening`` when given (a linear map of the very vectors the model
    gives), with a training sample of at most ``max_train`` vectors."""

    def mapped(vectors: np.ndarray) -> np.ndarray:
        return vectors if whitening is None else whitening.apply(vectors)

    chunks = (
        ([GalleryItem(i.uri, i.label, dict(i.extra), i.sha256) for i in items], mapped(vectors))
        for items, vectors in shards.iter_chunks(chunk_rows)
    )
    description = {
        "source": str(shards.header["source"]),
        "shards": str(shards.folder.resolve()),
        "skipped_unreadable": len(shards.skipped()),
    }
    train = mapped(training_sample(shards.files, max_train))
    dim = shards.dim if whitening is None else whitening.dim_out
    return Gallery(chunks, train, dim, description)

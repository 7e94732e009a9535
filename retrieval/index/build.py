"""Reading embedding shards larger than memory, to build an index from them.

The vectors stay on disk in ``.npy`` files (see :mod:`retrieval.index.shards`), memory-mapped one
file at a time: an index is trained on :func:`training_sample`, drawn uniformly across all
files, then given the files ``chunk_rows`` rows at a time by :func:`iter_chunks`. Peak memory
is the index itself plus one chunk and one file's mapped pages, whatever the number of vectors
(10,000,000 x 128 into ``IVF4096,PQ16np``: about 0.4 GB of index)::

    index = EmbeddingIndex(dim, factory, use_gpu=False)
    sample = training_sample(files, max_train, seed)
    index.train(sample, max_train=len(sample), seed=seed)
    for chunk in iter_chunks(files, chunk_rows):
        index.add(chunk)

The sample is the one :meth:`EmbeddingIndex.train` would draw from all the rows at once
(``default_rng(seed).choice(n, max_train, replace=False)``, in row order), so a chunked build
and a one-shot ``EmbeddingIndex.add`` of the same rows train on the same vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from retrieval.index._checks import sample_positions
from retrieval.infra.checks import positive_int

__all__ = ["iter_chunks", "training_sample", "vector_counts"]

PathLike = str | Path


def _open(path: PathLike) -> np.ndarray:
    """Memory-map a 2-D float32 ``.npy`` (read-only); ValueError naming the file otherwise."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read it as a .npy array ({err})") from err
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"{path}: need a 2-D float32 array, got {array.dtype} {array.shape}")
    return array


def vector_counts(files: Sequence[PathLike]) -> list[int]:
    """Rows of each ``.npy`` file (headers only); all files must have the same dimension."""
    shapes = [_open(f).shape for f in files]
    if len({d for _, d in shapes}) > 1:
        raise ValueError(f"the files hold vectors of different dimensions: {shapes}")
    return [n for n, _ in shapes]


def training_sample(files: Sequence[PathLike], max_rows: int, seed: int = 0) -> np.ndarray:
    """(min(n, max_rows), dim) float32 rows of the files, chosen by :func:`sample_positions`
    over their concatenation (n rows in all); one file mapped at a time."""
    counts = vector_counts(files)
    positions = sample_positions(sum(counts), max_rows, seed)
    parts, start = [], 0
    for path, count in zip(files, counts, strict=True):
        lo, hi = np.searchsorted(positions, [start, start + count])
        array = _open(path)
        parts.append(np.array(array[positions[lo:hi] - start]))
        del array  # unmap before the next file
        start += count
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def iter_chunks(files: Sequence[PathLike], chunk_rows: int = 100_000) -> Iterator[np.ndarray]:
    """The files' rows in order, as (chunk_rows, dim) float32 copies (the last one shorter);
    chunks span file boundaries. Files with no rows are skipped."""
    positive_int(chunk_rows, "chunk_rows")
    pending: list[np.ndarray] = []
    have = 0
    for path in files:
        array = _open(path)
        start = 0
        while start < array.shape[0]:
            take = min(chunk_rows - have, array.shape[0] - start)
            pending.append(np.array(array[start : start + take]))
            have, start = have + take, start + take
            if have == chunk_rows:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, have = [], 0
        del array
    if pending:
        yield np.concatenate(pending)

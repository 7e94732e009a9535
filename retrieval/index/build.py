"""Building an index from embedding shards larger than memory.

The vectors stay on disk in ``.npy`` files (see :mod:`retrieval.index.shards`), memory-mapped one
file at a time: the index is trained on a sample drawn uniformly across all files, then the
files are added ``chunk_rows`` rows at a time. Peak memory is the index itself plus one chunk
and one file's mapped pages, whatever the number of vectors (10,000,000 x 128 into
``IVF4096,PQ16np``: about 0.4 GB of index).

The sample is the one :meth:`EmbeddingIndex.train` would draw from all the rows at once
(``default_rng(seed).choice(n, max_train, replace=False)``, in row order), so a chunked build
and a one-shot ``EmbeddingIndex.add`` of the same rows train on the same vectors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index._checks import sample_positions
from retrieval.index.embedding_index import EmbeddingIndex
from retrieval.index.shards import (
    FORMAT,
    PLAN_FILE,
    ShardError,
    ShardItem,
    shard_files,
    shard_problem,
)
from retrieval.infra.checks import positive_int
from retrieval.infra.io import sha256_file

__all__ = [
    "ShardSet",
    "add_from_files",
    "build_index",
    "iter_chunks",
    "sample_positions",
    "training_sample",
    "vector_counts",
]

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


def add_from_files(
    index: EmbeddingIndex, files: Sequence[PathLike], chunk_rows: int = 100_000
) -> None:
    """Add every row of ``files`` to a trained ``index``, ``chunk_rows`` at a time."""
    if not index.is_trained:
        raise ValueError(f"train the {index.factory!r} index first (see training_sample)")
    for chunk in iter_chunks(files, chunk_rows):
        index.add(chunk)


def build_index(
    files: Sequence[PathLike],
    factory: str = "Flat",
    search_params: str = "",
    max_train: int = 100_000,
    seed: int = 0,
    chunk_rows: int = 100_000,
    use_gpu: bool | None = False,
) -> EmbeddingIndex:
    """An index of every row of ``files`` (ids in file then row order): trained on
    :func:`training_sample` ``(files, max_train, seed)`` when it needs training, then filled
    by :func:`add_from_files`.

    Raises:
        ValueError: no rows, unreadable or mismatched files, bad factory / parameters, or
            too few rows to train the index.
    """
    counts = vector_counts(files)
    if not sum(counts):
        raise ValueError("the files hold no vectors to index")
    dim = _open(files[0]).shape[1]
    index = EmbeddingIndex(dim, factory, use_gpu=use_gpu, search_params=search_params)
    if not index.is_trained:
        sample = training_sample(files, max_train, seed)
        index.train(sample, max_train=sample.shape[0], seed=seed)
    add_from_files(index, files, chunk_rows)
    return index


class ShardSet:
    """A finished shards folder written by :func:`retrieval.index.shards.embed_shards`, read-only.

    Raises (from :meth:`open`):
        ShardError: not a shards folder, or some shards unfinished or damaged.
    """

    def __init__(self, folder: Path, header: dict[str, Any], counts: list[int]) -> None:
        self.folder, self.header, self.counts = folder, header, counts

    @classmethod
    def open(cls, folder: PathLike) -> ShardSet:
        root = Path(folder)
        try:
            header = json.loads((root / PLAN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ShardError(f"{root} is not a shards folder ({PLAN_FILE}: {err})") from err
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ShardError(f"{root / PLAN_FILE} is not a {FORMAT} plan")
        dim = int(header["dim"])
        problems = {s: shard_problem(root, s, dim) for s in range(int(header["num_shards"]))}
        bad = {s: p for s, p in problems.items() if p is not None}
        if bad:
            listed = "; ".join(f"shard {s}: {p}" for s, p in list(bad.items())[:5])
            raise ShardError(
                f"{root}: {len(bad)} of {len(problems)} shards are not finished ({listed}); "
                f"run python embed.py out_dir={root} (same images, model and shard_size, every "
                "worker) again to finish them"
            )
        counts = [int(json.loads(shard_files(root, s)[1].read_text())["count"]) for s in problems]
        return cls(root, header, counts)

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    @property
    def count(self) -> int:
        """Vectors in all shards (the plan's items less the unreadable ones)."""
        return sum(self.counts)

    @property
    def files(self) -> list[Path]:
        """The shards' ``.npy`` files, in shard order."""
        return [shard_files(self.folder, s)[0] for s in range(len(self.counts))]

    def _record(self, shard: int) -> dict[str, Any]:
        return dict(json.loads(shard_files(self.folder, shard)[1].read_text(encoding="utf-8")))

    def items(self, shard: int) -> list[ShardItem]:
        """The items of ``shard``, in row order."""
        return [ShardItem(**row) for row in self._record(shard)["items"]]

    def skipped(self) -> list[tuple[str, str]]:
        """``(uri, reason)`` of every image skipped as unreadable."""
        records = (self._record(s) for s in range(len(self.counts)))
        return [(row["uri"], row["reason"]) for r in records for row in r["skipped"]]

    def verify(self) -> None:
        """Check every ``.npy`` against the sha256 its ``.ids.json`` recorded (reads them all).

        Raises:
            ShardError: a file changed since it was written.
        """
        for shard, path in enumerate(self.files):
            if sha256_file(path) != self._record(shard)["npy_sha256"]:
                raise ShardError(f"{path} changed since it was written: embed that shard again")

    def iter_chunks(
        self, chunk_rows: int = 100_000
    ) -> Iterator[tuple[list[ShardItem], np.ndarray]]:
        """``(items, vectors)`` of consecutive rows across shards, ``chunk_rows`` at a time."""
        items = chain.from_iterable(self.items(s) for s in range(len(self.counts)))
        for vectors in iter_chunks(self.files, chunk_rows):
            yield list(islice(items, vectors.shape[0])), vectors

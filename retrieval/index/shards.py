"""Embedding shards: a large image set embedded in fixed-size pieces by any number of workers.

A shards folder holds::

    shards.json              the plan: items, shard_size, num_shards, items_sha256, dim,
                             model fingerprint, preprocessing (same for every worker)
    shard-00000.npy          (rows, dim) float32, L2-normalised, in row order
    shard-00000.ids.json     the rows' items (uri, label, extra, sha256) in row order, the
                             images skipped as unreadable, the row count and the .npy's sha256

Shard ``i`` holds the readable items ``i * shard_size ... (i + 1) * shard_size - 1`` of the
plan. The ``.ids.json`` is a shard's commit point: a shard is finished when it exists and
the ``.npy`` holds the rows it records (:func:`shard_problem`). Writing, by workers that
resume after a kill, is :mod:`retrieval.index.shard_writer`; :class:`ShardSet` reads a
finished folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.build import iter_chunks
from retrieval.infra.io import sha256_file

__all__ = [
    "PLAN_FILE",
    "ShardError",
    "ShardItem",
    "ShardSet",
    "shard_files",
    "shard_problem",
]

PathLike = str | Path

PLAN_FILE = "shards.json"
FORMAT, VERSION = "retrieval-shards", 1
#: shards.json fields that two runs must agree on to share a folder.
IDENTITY = ("items", "shard_size", "num_shards", "items_sha256", "dim", "model_fingerprint")


class ShardError(ValueError):
    """A shards folder is foreign, damaged, incomplete or from another plan or model."""


@dataclass(frozen=True, slots=True)
class ShardItem:
    """One image of the plan: ``uri`` (absolute path), ``label`` and extra fields; ``sha256``
    of the file's bytes once embedded (None in the plan)."""

    uri: str
    label: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    sha256: str | None = None


def shard_files(folder: str | Path, shard: int) -> tuple[Path, Path]:
    """``(vectors .npy, items .ids.json)`` of ``shard`` in ``folder``."""
    stem = Path(folder) / f"shard-{shard:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".ids.json")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ShardError when it cannot be read or is no object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise ShardError(f"{path} is not a JSON object")
    return data


def shard_problem(folder: str | Path, shard: int, dim: int) -> str | None:
    """Why ``shard`` is not finished (``None`` when it is): no ``.ids.json``, or a ``.npy``
    that is missing, unreadable or not (rows, dim) float32 for the rows recorded."""
    npy, ids = shard_files(folder, shard)
    if not ids.is_file():
        return "not written"
    try:
        rows = int(read_json_object(ids)["count"])
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"damaged ({err})"
    if array.dtype != np.float32 or array.shape != (rows, dim):
        return f"{npy} is {array.dtype} {array.shape}, {ids.name} records ({rows}, {dim}) float32"
    return None


class ShardSet:
    """A finished shards folder written by
    :func:`retrieval.index.shard_writer.embed_shards`, read-only.

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

    def shard_vectors(self) -> Iterator[np.ndarray]:
        """Each shard's (rows, dim) float32 vectors, in shard order, memory-mapped: one shard
        is read at a time (rows numbered consecutively across shards, as :meth:`items_at`)."""
        for path in self.files:
            yield np.load(path, mmap_mode="r", allow_pickle=False)

    def items_at(self, rows: Sequence[int]) -> list[ShardItem]:
        """The items of rows ``rows`` (0-based over all shards, in shard order), reading only
        the shards that hold them.

        Raises:
            IndexError: a row outside ``[0, count)``.
        """
        starts = np.cumsum([0, *self.counts])
        wanted = [int(r) for r in rows]
        if any(not 0 <= r < self.count for r in wanted):
            raise IndexError(f"rows must lie in [0, {self.count}) of {self.folder}")
        shards = np.searchsorted(starts, wanted, side="right") - 1
        read = {int(s): self.items(int(s)) for s in set(shards.tolist())}
        return [read[int(s)][r - int(starts[s])] for r, s in zip(wanted, shards, strict=True)]

    def iter_chunks(
        self, chunk_rows: int = 100_000
    ) -> Iterator[tuple[list[ShardItem], np.ndarray]]:
        """``(items, vectors)`` of consecutive rows across shards, ``chunk_rows`` at a time."""
        items = chain.from_iterable(self.items(s) for s in range(len(self.counts)))
        for vectors in iter_chunks(self.files, chunk_rows):
            yield list(islice(items, vectors.shape[0])), vectors

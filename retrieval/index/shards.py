"""Embedding shards: a large image set embedded in fixed-size pieces by any number of workers,
and read back chunk by chunk to build an index larger than memory.

A shards folder holds::

    shards.json              the plan: items, shard_size, num_shards, items_sha256, dim,
                             model fingerprint, preprocessing (same for every worker)
    shard-00000.npy          (rows, dim) float32, L2-normalised, in row order
    shard-00000.ids.json     the rows' items (uri, label, extra, sha256) in row order, the
                             images skipped as unreadable, the row count and the .npy's sha256

Shard ``i`` holds the readable items ``i * shard_size ... (i + 1) * shard_size - 1`` of the
plan. The ``.ids.json`` is a shard's commit point: a shard is finished when it exists and
the ``.npy`` holds the rows it records (:func:`shard_problem`).

Writing: worker ``rank`` of ``world`` embeds shards ``rank, rank + world, ...``
(:func:`embed_shards`). Both files of a shard are written atomically (temp file, fsync,
rename), the ``.npy`` first and the ``.ids.json`` last, so a kill leaves a shard either
finished or not, and a rerun embeds only the unfinished ones.

Reading: :class:`ShardSet` is a finished folder. The vectors stay on disk, memory-mapped one
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

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.embedding_index import sample_positions
from retrieval.infra.checks import positive_int
from retrieval.infra.io import atomic_write, sha256_file

__all__ = [
    "PLAN_FILE",
    "ShardContent",
    "ShardError",
    "ShardItem",
    "ShardPlan",
    "ShardSet",
    "embed_shards",
    "iter_chunks",
    "shard_files",
    "shard_problem",
    "training_sample",
    "vector_counts",
    "worker_identity",
    "write_shard",
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
    :func:`embed_shards`, read-only.

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


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardContent:
    """What embedding one shard gave: ``vectors`` (n, dim) float32 unit rows, ``items`` (n,)
    in row order (with ``sha256``), ``skipped`` ``(uri, reason)`` of unreadable images."""

    vectors: np.ndarray
    items: list[ShardItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardPlan:
    """The items to embed, cut into shards of ``shard_size``; every worker builds the same."""

    items: Sequence[ShardItem]
    shard_size: int

    def __post_init__(self) -> None:
        positive_int(self.shard_size, "shard_size")
        if not self.items:
            raise ValueError("the plan has no items to embed")

    @property
    def num_shards(self) -> int:
        return -(-len(self.items) // self.shard_size)

    def items_of(self, shard: int) -> list[ShardItem]:
        """The plan's items of ``shard`` (before unreadable ones are skipped)."""
        return list(self.items[shard * self.shard_size : (shard + 1) * self.shard_size])

    def digest(self) -> str:
        """sha256 hex of the item list (uri, label, extra), in order."""
        digest = hashlib.sha256()
        for item in self.items:
            extra = json.dumps(dict(item.extra), sort_keys=True)
            digest.update(f"{item.uri}\0{item.label}\0{extra}\n".encode())
        return digest.hexdigest()

    def assigned(self, rank: int, world: int) -> list[int]:
        """The shards worker ``rank`` of ``world`` embeds: ``rank, rank + world, ...``."""
        return list(range(rank, self.num_shards, world))


def worker_identity(
    rank: int | None = None, world: int | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """``(rank, world)``: the arguments when given, else ``RANK`` / ``WORLD_SIZE`` (torchrun),
    else ``SLURM_PROCID`` / ``SLURM_NTASKS``, else ``(0, 1)``.

    Raises:
        ValueError: only one of a pair is set, or not ``0 <= rank < world``.
    """
    env = os.environ if env is None else env
    if rank is None and world is None:
        for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if r in env or w in env:
                if r not in env or w not in env:
                    raise ValueError(f"{r} and {w} must be set together (found only one)")
                rank, world = int(env[r]), int(env[w])
                break
        else:
            rank, world = 0, 1
    if rank is None or world is None:
        raise ValueError("pass both rank and world_size, or neither (then read from the env)")
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world}")
    return int(rank), int(world)


def write_shard(folder: str | Path, shard: int, content: ShardContent, dim: int) -> None:
    """Write ``content`` as ``shard``: the ``.npy`` atomically, then the ``.ids.json``.

    Raises:
        ValueError: vectors not (len(items), dim) finite float32 rows.
    """
    x = np.ascontiguousarray(content.vectors, dtype=np.float32)
    if x.shape != (len(content.items), dim) or not np.isfinite(x).all():
        raise ValueError(f"shard {shard}: need ({len(content.items)}, {dim}) finite vectors")
    npy, ids = shard_files(folder, shard)
    with atomic_write(npy) as handle:
        np.save(handle, x, allow_pickle=False)
    record = {
        "shard": shard,
        "count": len(content.items),
        "dim": dim,
        "npy_sha256": sha256_file(npy),
        "items": [asdict(item) for item in content.items],
        "skipped": [{"uri": uri, "reason": why} for uri, why in content.skipped],
    }
    with atomic_write(ids, "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def _claim_plan(folder: Path, header: dict[str, Any]) -> None:
    """Write ``shards.json`` if absent (never replacing one), else check it is this plan's."""
    path = folder / PLAN_FILE
    header = json.loads(json.dumps(header))  # tuples -> lists, as read back
    if not path.exists():
        tmp = folder / f".{PLAN_FILE}.{uuid.uuid4().hex}.new"
        try:
            with atomic_write(tmp, "w") as handle:
                json.dump(header, handle, indent=2)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # never replaces the plan of a worker that was quicker
        finally:
            tmp.unlink(missing_ok=True)
    found = read_json_object(path)
    differ = [k for k in (*IDENTITY, "preprocessing") if found.get(k) != header.get(k)]
    if found.get("format") != FORMAT or differ:
        raise ShardError(
            f"{path} describes other shards (differs in {differ or ['format']}): another image "
            "list, shard_size or model wrote this folder; use a new out_dir, or rerun with the "
            "same images, shard_size, model and preprocessing to resume"
        )


def embed_shards(
    folder: str | Path,
    plan: ShardPlan,
    header: dict[str, Any],
    embed: Callable[[int, list[ShardItem]], ShardContent],
    rank: int = 0,
    world: int = 1,
) -> dict[str, list[int]]:
    """Embed this worker's unfinished shards of ``plan`` into ``folder``.

    Args:
        header: what ``shards.json`` records besides the plan: ``dim`` (int),
            ``model_fingerprint``, ``preprocessing`` and descriptive fields.
        embed: ``(shard, items) -> ShardContent`` for one shard's plan items.
        rank, world: this worker's share (see :meth:`ShardPlan.assigned`).

    Returns:
        ``{"embedded": [...], "kept": [...]}``: shards written now, shards already finished.

    Raises:
        ShardError: ``folder`` holds shards of another plan or model.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    full = {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "items": len(plan.items),
        "shard_size": int(plan.shard_size),
        "num_shards": plan.num_shards,
        "items_sha256": plan.digest(),
        "normalized": True,
        "dtype": "float32",
    }
    _claim_plan(root, full)
    dim = int(header["dim"])
    done: dict[str, list[int]] = {"embedded": [], "kept": []}
    for shard in plan.assigned(rank, world):
        problem = shard_problem(root, shard, dim)
        if problem is None:
            done["kept"].append(shard)
            continue
        if problem != "not written":
            log.warning("shard %d is %s: embedding it again", shard, problem)
        for name in shard_files(root, shard):  # temp files of a run killed mid-write
            for stale in root.glob(f".{name.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        write_shard(root, shard, embed(shard, plan.items_of(shard)), dim)
        done["embedded"].append(shard)
    return done

"""Writing embedding shards (the folder of :mod:`retrieval.index.shards`): the plan every
worker builds, the workers' shares and the atomic, resumable shard files.

Worker ``rank`` of ``world`` embeds shards ``rank, rank + world, ...``. Both files of a
shard are written atomically (temp file, fsync, rename), the ``.npy`` first and the
``.ids.json`` last: the ``.ids.json`` is the commit point, so a kill leaves a shard either
finished (its ``.npy`` holds the recorded rows) or not, and a rerun embeds only the
unfinished ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index.shards import (
    FORMAT,
    IDENTITY,
    PLAN_FILE,
    VERSION,
    ShardError,
    ShardItem,
    read_json_object,
    shard_files,
    shard_problem,
)
from retrieval.infra.checks import positive_int
from retrieval.infra.io import atomic_write, sha256_file

__all__ = [
    "ShardContent",
    "ShardPlan",
    "embed_shards",
    "worker_identity",
    "write_shard",
]

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

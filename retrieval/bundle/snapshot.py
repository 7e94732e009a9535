"""Index snapshots: the FAISS index file of a bundle's items (``index.faiss``), the record of
it in the item table, and the index brought up to the table's state from it.

Protocol (the table is always written first, so a kill loses nothing acknowledged):

1. Adds and removals commit to ``items.sqlite``; the index file is not touched.
2. :func:`write_snapshot` writes ``index.faiss.pending`` (temp file, fsync, rename), records
   its sha256 with (ntotal, max id, removal seq) in the table, then renames it to
   ``index.faiss``.
3. :func:`load_index` finishes that rename when the pending file's sha256 is the one recorded
   (else deletes it), loads ``index.faiss`` checked against the recorded sha256, then replays
   the table: removes the positions of snapshot items removed since, adds active ids > max id.
4. A missing, damaged or mismatched index raises :class:`IndexStateError`; it is never
   rebuilt silently: ``rebuild=True`` re-creates it from the stored vectors.

The writer holds an exclusive ``flock`` on ``.snapshot.lock`` while it records a snapshot and
renames its file; a reader (:func:`load_index_read_only`) loads one under a shared lock, so it
never pairs one snapshot's record with another's file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.bundle.records import Snapshot, StoreError
from retrieval.index import EmbeddingIndex, sample_positions
from retrieval.infra.io import fsync_dir, sha256_file
from retrieval.infra.locks import file_lock

if TYPE_CHECKING:
    from retrieval.bundle.item_table import ItemTable

__all__ = [
    "INDEX_FILE",
    "PENDING_FILE",
    "SNAPSHOT_LOCK_FILE",
    "IndexStateError",
    "build_from_table",
    "load_index",
    "load_index_read_only",
    "snapshot_file_problems",
    "write_snapshot",
]

INDEX_FILE = "index.faiss"
PENDING_FILE = "index.faiss.pending"
SNAPSHOT_LOCK_FILE = ".snapshot.lock"


class IndexStateError(ValueError):
    """The index file is missing, damaged or does not match the item store."""


@contextmanager
def _snapshot_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """``flock`` on ``root/.snapshot.lock``: exclusive while a writer records a snapshot and
    renames its file, shared while a reader loads one."""
    with file_lock(root / SNAPSHOT_LOCK_FILE, exclusive):
        yield


def build_from_table(
    table: ItemTable, factory: str, search_params: str, max_train: int = 100_000
) -> tuple[EmbeddingIndex, np.ndarray]:
    """A new index of the table's active vectors (trained on up to ``max_train`` of them,
    drawn with seed 0) and its position -> id array."""
    index = EmbeddingIndex(table.dim, factory, use_gpu=False, search_params=search_params)
    if not index.is_trained:
        active = table.active_ids()
        active = active[sample_positions(active.size, max_train, seed=0)]
        index.train(table.vectors(active.tolist()))
    parts = [np.empty(0, dtype=np.int64)]
    for ids, vectors in table.iter_active():
        index.add(vectors)
        parts.append(ids)
    return index, np.concatenate(parts)


def _finish_pending(root: Path, snap: Snapshot) -> None:
    """Complete or discard a snapshot interrupted between its steps (protocol step 3)."""
    for stale in root.glob(f".{INDEX_FILE}*.tmp"):  # left by a kill inside a save
        stale.unlink(missing_ok=True)
    pending = root / PENDING_FILE
    if pending.exists():
        if sha256_file(pending) == snap.index_sha256:
            os.replace(pending, root / INDEX_FILE)
            fsync_dir(root)
        else:
            pending.unlink()


def _snapshot_file(root: Path, snap: Snapshot) -> Path:
    """The file a reader loads: ``index.faiss``, or the pending file of a writer killed between
    recording it and renaming it (a reader does not finish the rename: it never writes)."""
    pending = root / PENDING_FILE
    if pending.exists() and sha256_file(pending) == snap.index_sha256:
        return pending
    return root / INDEX_FILE


def _replay(
    root: Path, table: ItemTable, snap: Snapshot, path: Path | None = None
) -> tuple[EmbeddingIndex, np.ndarray]:
    """The snapshot's index (``path``, default ``index.faiss``) brought up to the table's
    state, and its position -> id array."""
    path = path or root / INDEX_FILE
    hint = (
        f"IndexedItems.open({str(root)!r}, rebuild_index=True) re-creates it from the "
        f"{table.active_count} stored vectors"
    )
    try:
        index = EmbeddingIndex.load(
            path,
            dim=table.dim,
            factory=snap.factory,
            use_gpu=False,
            search_params=snap.search_params,
            sha256=snap.index_sha256,
        )
    except (FileNotFoundError, ValueError) as err:
        raise IndexStateError(f"cannot load the index snapshot {path}: {err}; {hint}") from err
    covered = table.snapshot_ids(snap.max_id, snap.removal_seq)
    if not index.ntotal == snap.ntotal == covered.size:
        raise IndexStateError(
            f"index {path} holds {index.ntotal} vectors, its snapshot record says {snap.ntotal}"
            f" and the store had {covered.size} active items then: they do not match; {hint}"
        )
    removed = table.removed_since(snap.removal_seq, snap.max_id)
    ids = covered
    if removed.size:
        gone = np.isin(covered, removed)
        try:
            index.remove_ids(np.flatnonzero(gone))
        except ValueError:  # HNSW and other indexes that cannot remove vectors
            return build_from_table(table, snap.factory, snap.search_params)
        ids = covered[~gone]
    parts = [ids]
    for new_ids, vectors in table.iter_active(after_id=snap.max_id):
        index.add(vectors)
        parts.append(new_ids)
    return index, np.concatenate(parts)


def _last(table: ItemTable) -> Snapshot:
    snap = table.last_snapshot()
    if snap is None:
        raise IndexStateError(f"{table.path} records no index snapshot")
    return snap


def load_index(
    root: Path, table: ItemTable, rebuild: bool
) -> tuple[Snapshot, EmbeddingIndex, np.ndarray]:
    """The writer's index of the folder ``root`` (protocol step 3): the last snapshot, the
    index brought up to the table's state (built anew from the stored vectors with
    ``rebuild``) and its position -> id array.

    Raises:
        IndexStateError: no snapshot recorded; its file missing, damaged or not the one
            recorded. StoreError: ``rebuild`` over damaged active rows.
    """
    snap = _last(table)
    with _snapshot_lock(root, exclusive=True):
        _finish_pending(root, snap)
    if not rebuild:
        return (snap, *_replay(root, table, snap))
    damaged = table.check_rows(active_only=True)
    if damaged:
        raise StoreError(
            f"cannot rebuild the index of {root}: damaged rows in {table.path}: "
            f"{'; '.join(damaged)}. Repair them, or mark them removed "
            f"(ItemTable.open({str(table.path)!r}).remove(ids)), and rebuild again"
        )
    return (snap, *build_from_table(table, snap.factory, snap.search_params))


def load_index_read_only(root: Path, table: ItemTable) -> tuple[EmbeddingIndex, np.ndarray]:
    """A reader's index of ``root``: the table's state and the snapshot it records read in
    one transaction, the snapshot's file loaded under the shared snapshot lock; nothing is
    written."""
    with _snapshot_lock(root, exclusive=False), table.read_transaction():
        snap = _last(table)
        return _replay(root, table, snap, _snapshot_file(root, snap))


def write_snapshot(root: Path, table: ItemTable, index: EmbeddingIndex) -> Snapshot:
    """Write ``index`` (equal to the table's active items) as ``root/index.faiss`` and record
    it in ``table`` (protocol step 2); return the record."""
    pending = root / PENDING_FILE
    state = (index.ntotal, table.max_id, table.removal_seq)
    sha = index.save(pending)  # searches may go on: saving only reads the index
    with _snapshot_lock(root, exclusive=True):  # readers never see record != file
        snap = table.record_snapshot(Snapshot(sha, *state, index.factory, index.search_params))
        os.replace(pending, root / INDEX_FILE)
        fsync_dir(root)
    return snap


def snapshot_file_problems(root: Path, table: ItemTable) -> list[str]:
    """Why ``root/index.faiss`` is not the last snapshot the table records (``[]`` if it is)."""
    snap, path = table.last_snapshot(), root / INDEX_FILE
    if snap is None:
        return ["the store records no index snapshot"]
    if not path.is_file():
        return [f"snapshot file {path} is missing"]
    actual = sha256_file(path)
    if actual != snap.index_sha256:
        return [f"{path} has sha256 {actual}, its snapshot record {snap.index_sha256}"]
    return []

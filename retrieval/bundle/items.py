"""IndexedItems: an :class:`~retrieval.bundle.item_table.ItemTable` and the FAISS index over
its active items, kept equal, in a folder (see :mod:`retrieval.bundle.item_folder`).

Invariant: FAISS position ``p`` holds the ``p``-th active item in id order. ``add`` /
``remove`` commit to ``items.sqlite`` first (durable on return), then change the in-memory
index; the index file is written by snapshots and read back, brought up to the table's state,
by ``open`` (see :mod:`retrieval.bundle.snapshot`). A missing, damaged or mismatched index
raises :class:`~retrieval.bundle.snapshot.IndexStateError`; it is never rebuilt silently:
``open(folder, rebuild_index=True)`` re-creates it from stored vectors.

One process at a time may open a folder for writing: ``retrieval serve``, ``retrieval index``.
Any number of others may open it read-only (``open(folder, read_only=True)``: ``retrieval
search``, ``info``, ``score``) beside that writer: they see the items committed when they
opened (items removed later are left out of their results) and never write. Within a process,
searches run concurrently from any number of threads (see
:mod:`retrieval.bundle.indexed_reads`); ``add`` / ``remove`` / ``snapshot`` are serialised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from retrieval.bundle.additions import AddResult, plan_add
from retrieval.bundle.format import ReadOnlyError
from retrieval.bundle.indexed_reads import IndexedReads
from retrieval.bundle.item_checks import check_vectors
from retrieval.bundle.item_folder import (
    STORE_FILE,
    create_folder,
    open_folder,
    open_folder_read_only,
)
from retrieval.bundle.item_table import Check
from retrieval.bundle.records import ItemRecord
from retrieval.bundle.snapshot import Snapshot, build_from_table, write_snapshot
from retrieval.postprocess.steps import dba_vectors_for

__all__ = ["IndexedItems"]

log = logging.getLogger(__name__)


class IndexedItems(IndexedReads):
    """The bundle's mutable search state in a folder: see the module docstring.

    Build with :meth:`create` or :meth:`open`; :meth:`close` (or ``with``) snapshots pending
    changes and releases the folder. ``snapshot_every``: snapshot automatically once at
    least this many vectors were added or removed since the last snapshot AND at least
    ``snapshot_growth`` times ``ntotal`` (so big indexes are not rewritten for small
    changes); ``None`` or 0 snapshots only on :meth:`snapshot` and :meth:`close`.
    """

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        dim: int,
        factory: str = "Flat",
        search_params: str = "",
        train_vectors: np.ndarray | None = None,
        *,
        snapshot_every: int | None = 1000,
        snapshot_growth: float = 0.05,
        max_train: int = 100_000,
    ) -> IndexedItems:
        """Create an empty table and index in ``folder`` (made if missing).

        Args:
            train_vectors: (n, dim) L2-normalised sample to train IVF / PQ indexes on;
                required for those, ignored by indexes that need no training.
            max_train: train on at most this many of them (drawn with seed 0).

        Raises:
            FileExistsError: ``folder`` already has an ``items.sqlite``.
            ValueError: bad ``dim`` / factory / search_params, or an index that needs
                ``train_vectors`` (or more of them).
        """
        root = Path(folder)
        store, index, lock = create_folder(
            root, dim, factory, search_params, train_vectors, max_train
        )
        ids = np.empty(0, dtype=np.int64)
        return cls(root, store, index, ids, lock, snapshot_every, snapshot_growth)

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        *,
        rebuild_index: bool = False,
        check: Check = "quick",
        snapshot_every: int | None = 1000,
        snapshot_growth: float = 0.05,
        read_only: bool = False,
    ) -> IndexedItems:
        """Open ``folder``: load the last index snapshot and replay the table after it.

        Args:
            read_only: open beside a writer (see the module docstring): no folder lock, a
                read-only table connection, nothing written; ``add`` / ``remove`` /
                ``snapshot`` raise :class:`ReadOnlyError`.
            rebuild_index: ignore ``index.faiss`` and build the index from the stored
                vectors (IVF / PQ trained on a sample of them), then snapshot it.
            check: the table's integrity check at open: ``"quick"``, ``"full"``, ``"none"``.

        Raises:
            FileNotFoundError: no ``items.sqlite`` in ``folder``.
            StoreError: the table is not readable (see :meth:`ItemTable.open`).
            IndexStateError: no snapshot recorded; ``index.faiss`` missing, damaged, or not
                the one recorded (the message says how to rebuild it).
            BundleBusyError: the folder is open for writing elsewhere (not with ``read_only``).
        """
        root = Path(folder)
        if not (root / STORE_FILE).is_file():
            raise FileNotFoundError(f"no item store {root / STORE_FILE}: use IndexedItems.create")
        if read_only:
            if rebuild_index:
                raise ValueError("rebuild_index=True writes the index: open without read_only")
            store, index, ids = open_folder_read_only(root, check)
            return cls(root, store, index, ids, None, None, 0.0, read_only=True)
        store, snap, index, ids, lock = open_folder(root, check, rebuild_index)
        items = cls(root, store, index, ids, lock, snapshot_every, snapshot_growth)
        replayed = (
            store.max_id - snap.max_id + store.removed_since(snap.removal_seq, snap.max_id).size
        )
        items._since_snapshot = replayed  # close() snapshots them
        if rebuild_index:
            items.snapshot()
        return items

    def check_writable(self) -> None:
        """Raise ReadOnlyError when opened read-only (and RuntimeError when closed or broken)."""
        if self._read_only:
            raise ReadOnlyError(
                f"{self._root} was opened read-only: adds, removals and snapshots need the "
                "folder opened for writing (only one process at a time may)"
            )
        self._check_usable()

    def add(
        self,
        records: Sequence[ItemRecord],
        vectors: np.ndarray,
        base_vectors: np.ndarray | None = None,
        dba: tuple[int, float] | None = None,
    ) -> AddResult:
        """Add items: table first (durable when this returns), then the index.

        A record whose ``content_sha256`` is that of an active item, or of an earlier record
        in the same call, is not added: its result id is the existing one and it is listed
        in ``duplicates``. Records without ``content_sha256`` are always added.

        Args:
            records: n :class:`ItemRecord`. vectors: (n, dim) L2-normalised real array.
            base_vectors: (n, dim) un-augmented vectors of ``vectors``, stored beside them
                (a gallery augmented as a whole, at export).
            dba: ``(k, alpha)``: ``vectors`` are un-augmented; the new items are stored and
                indexed with the database-side augmentation over the stored base vectors
                of the active items and each other (as augmenting the whole gallery anew
                would give them; items already stored keep their vectors).

        Raises:
            ValueError / TypeError: bad records or vectors (nothing is written).
        """
        if any(not isinstance(r, ItemRecord) for r in records):
            raise TypeError("records must be ItemRecord instances")
        x = check_vectors(vectors, self.dim, len(records))
        with self._mutate:
            self.check_writable()
            plan = plan_add(records, self._existing)
            fresh = plan.fresh
            base = None
            if base_vectors is not None:
                base = check_vectors(base_vectors, self.dim, len(records))[fresh]
            searched = x[fresh]
            if dba is not None and fresh:
                _, pool = self._store.active_base_vectors()
                base = searched
                searched = dba_vectors_for(base, pool, int(dba[0]), float(dba[1]))
            added = self._store.add([records[i] for i in fresh], searched, base)
            if added:
                with self._after_commit(), self._rw.write():
                    self._index.add(searched)
                    self._ids = np.concatenate([self._ids, np.asarray(added, dtype=np.int64)])
                self._after_mutation(len(added))
        return plan.result(added)

    def _existing(self, shas: list[str]) -> dict[str, int]:
        """The lowest id of an active item with each of ``shas`` that one has."""
        found = {sha: self._store.find_by_sha256(sha) for sha in shas}
        return {sha: ids[0] for sha, ids in found.items() if ids}

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Remove items: table first (durable when this returns), then the index.

        HNSW indexes cannot remove vectors: the index is rebuilt from the table's vectors
        (O(ntotal); searches use the old one meanwhile) and snapshotted unless automatic
        snapshots are off.

        Returns:
            The distinct removed ids, sorted.

        Raises:
            KeyError: unknown ids. ValueError: ids already removed. Nothing changes then.
        """
        with self._mutate:
            self.check_writable()
            removed = self._store.remove(ids)
            if not removed:
                return []
            rebuilt = False
            with self._after_commit():
                gone = np.isin(self._ids, np.asarray(removed, dtype=np.int64))
                if int(gone.sum()) != len(removed):
                    raise RuntimeError(f"removed ids {removed} are not all in the index")
                try:
                    with self._rw.write():
                        self._index.remove_ids(np.flatnonzero(gone))
                        self._ids = self._ids[~gone]
                except ValueError:  # cannot remove (HNSW); the old index serves searches meanwhile
                    params = self._index.search_params
                    index, active = build_from_table(self._store, self.factory, params)
                    with self._rw.write():
                        self._index, self._ids = index, active
                    rebuilt = True
            self._after_mutation(len(removed), force=rebuilt)
        return removed

    @contextmanager
    def _after_commit(self) -> Iterator[None]:
        """Index changes that follow a table commit: a failure leaves the two unequal, so
        this object refuses further use (reopening replays the table)."""
        try:
            yield
        except BaseException as err:
            self._broken = err
            raise

    def _after_mutation(self, count: int, force: bool = False) -> None:
        """Count changed vectors; snapshot when due. A failed automatic snapshot is logged,
        not raised: the change itself is already durable in the table."""
        self._since_snapshot += count
        due = max(self._snapshot_every, self._snapshot_growth * self._index.ntotal)
        if self._snapshot_every and (force or self._since_snapshot >= due):
            try:
                self._snapshot_locked()
            except Exception:
                log.exception("automatic snapshot of %s failed; will retry", self._root)

    def snapshot(self) -> Snapshot:
        """Write the index to ``index.faiss`` and record it (see :func:`write_snapshot`)."""
        with self._mutate:
            self.check_writable()
            return self._snapshot_locked()

    def _snapshot_locked(self) -> Snapshot:
        if self._index.ntotal != self._ids.size:
            raise RuntimeError(f"index has {self._index.ntotal} vectors, {self._ids.size} ids")
        snap = write_snapshot(self._root, self._store, self._index)
        self._since_snapshot = 0
        return snap

    def close(self) -> None:
        """Snapshot unsaved changes, close the table and release the folder (idempotent)."""
        with self._mutate:
            if self._closed:
                return
            try:
                if self._since_snapshot and self._broken is None and not self._read_only:
                    self._snapshot_locked()
            finally:
                self._closed = True
                self._store.close()
                if self._lock_file is not None:
                    self._lock_file.close()

    def __enter__(self) -> IndexedItems:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

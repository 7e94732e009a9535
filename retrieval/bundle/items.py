"""IndexedItems: an :class:`ItemStore` and the FAISS index over its active items, kept equal.

A folder holds ``items.sqlite`` (the store), ``index.faiss`` (the last index snapshot) and
``.lock``. Invariant: FAISS position ``p`` holds the ``p``-th active item in id order.

Persistence protocol:

1. ``add`` / ``remove`` commit to ``items.sqlite`` first (durable on return), then change
   the in-memory index; the index file is not touched, so a kill loses nothing acknowledged.
2. ``snapshot()`` writes ``index.faiss.pending`` (temp file, fsync, rename), records its
   sha256 with (ntotal, max id, removal seq) in the store, then renames it to ``index.faiss``.
3. ``open()`` finishes that rename when the pending file's sha256 is the one recorded (else
   deletes it), loads ``index.faiss`` checked against the recorded sha256, then replays the
   store: removes the positions of snapshot items removed since, adds active ids > max id.
4. A missing, damaged or mismatched index raises :class:`IndexStateError`; it is never
   rebuilt silently: ``open(folder, rebuild_index=True)`` re-creates it from stored vectors.

One process at a time may open a folder for writing (an exclusive ``flock`` on ``.lock``;
POSIX only): ``retrieval serve``, ``retrieval index``. Any number of other processes may open it
read-only (``open(folder, read_only=True)``: ``retrieval search``, ``info``, ``score``) beside
that writer: they read the store through a read-only connection in one read transaction and
load the index snapshot under a shared ``flock`` on ``.snapshot.lock``, which the writer holds
exclusively while it records a snapshot and renames its file, so a reader never pairs one
snapshot's record with another's file. A reader sees the items committed when it opened
(items removed later are left out of its results); it never writes. Within a process,
searches run concurrently from any number of threads; ``add`` / ``remove`` / ``snapshot`` are
serialised, and swap the index and its position -> id mapping under a readers-writer lock,
so a search sees either the state before a change or after it. The index lives on the CPU
(FAISS GPU indexes are not thread-safe even for reads).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrieval.bundle.format import BundleBusyError, ReadOnlyError
from retrieval.bundle.store import (
    Check,
    Item,
    ItemRecord,
    ItemStore,
    Snapshot,
    StoreError,
    check_vectors,
)
from retrieval.index._checks import sample_positions
from retrieval.index import EmbeddingIndex
from retrieval.infra.io import fsync_dir, sha256_file
from retrieval.postprocess.steps import dba_vectors_for

__all__ = ["AddResult", "BundleBusyError", "IndexStateError", "IndexedItems", "ReadOnlyError"]

log = logging.getLogger(__name__)

STORE_FILE = "items.sqlite"
INDEX_FILE = "index.faiss"
PENDING_FILE = "index.faiss.pending"
LOCK_FILE = ".lock"
SNAPSHOT_LOCK_FILE = ".snapshot.lock"
#: label filters matching at most this many items score them exactly from their stored
#: vectors (O(matches) rows read); more are found by searching the index ever deeper
EXACT_MAX = 1024


class IndexStateError(ValueError):
    """The index file is missing, damaged or does not match the item store."""


@dataclass(frozen=True)
class AddResult:
    """What :meth:`IndexedItems.add` did.

    ``ids``: one id per record, in record order (new or, for a duplicate, the existing one).
    ``added``: the new ids. ``duplicates``: ``(record position, existing id)`` of records
    not added because an active item (or an earlier record of the same call) has their
    ``content_sha256``.
    """

    ids: list[int]
    added: list[int]
    duplicates: list[tuple[int, int]]


class _ReadWriteLock:
    """Many readers or one writer; waiting writers go first. Not re-entrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _lock_folder(root: Path) -> IO[Any] | None:
    """Hold an exclusive ``flock`` on ``root/.lock`` (None where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    handle = open(root / LOCK_FILE, "a+")  # noqa: SIM115 - held until close()
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise BundleBusyError(
            f"{root} is already open for writing (in this or another process, e.g. retrieval "
            "serve or retrieval index): searches can run beside it (read-only); adds and "
            "removals go through that process, or wait until it stops"
        ) from err
    return handle


@contextmanager
def _snapshot_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """``flock`` on ``root/.snapshot.lock``: exclusive while a writer records a snapshot and
    renames its file, shared while a reader loads one. Without fcntl, or for a reader of a
    folder where the lock file cannot be made (nobody can write there either), no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = root / SNAPSHOT_LOCK_FILE
    try:
        handle = open(path, "a+")  # noqa: SIM115 - closed below
    except OSError:
        if exclusive or path.exists():
            raise
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        handle.close()  # releases the lock


def _build_from_store(
    store: ItemStore, factory: str, search_params: str, max_train: int = 100_000
) -> tuple[EmbeddingIndex, np.ndarray]:
    """A new index of the store's active vectors (trained on up to ``max_train`` of them,
    drawn with seed 0) and its position -> id array."""
    index = EmbeddingIndex(store.dim, factory, use_gpu=False, search_params=search_params)
    if not index.is_trained:
        active = store.active_ids()
        active = active[sample_positions(active.size, max_train, seed=0)]
        index.train(store.vectors(active.tolist()))
    parts = [np.empty(0, dtype=np.int64)]
    for ids, vectors in store.iter_active():
        index.add(vectors)
        parts.append(ids)
    return index, np.concatenate(parts)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row of ``scores`` (nq, m) over the increasing ``ids`` (m,),
    equal scores by ascending id: (nq, min(k, m)) scores and ids."""
    k = min(k, ids.size)
    out_scores = np.empty((scores.shape[0], k), np.float32)
    out_ids = np.empty((scores.shape[0], k), np.int64)
    for row, values in enumerate(scores):
        if k < values.size:  # every score equal to the k-th stays a candidate
            kth = np.partition(values, values.size - k)[values.size - k]
            candidates = np.flatnonzero(values >= kth)
        else:
            candidates = np.arange(values.size)
        order = candidates[np.lexsort((candidates, -values[candidates]))[:k]]
        out_scores[row], out_ids[row] = values[order], ids[order]
    return out_scores, out_ids


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
    root: Path, store: ItemStore, snap: Snapshot, path: Path | None = None
) -> tuple[EmbeddingIndex, np.ndarray]:
    """The snapshot's index (``path``, default ``index.faiss``) brought up to the store's
    state, and its position -> id array."""
    path = path or root / INDEX_FILE
    hint = (
        f"IndexedItems.open({str(root)!r}, rebuild_index=True) re-creates it from the "
        f"{store.active_count} stored vectors"
    )
    try:
        index = EmbeddingIndex.load(
            path,
            dim=store.dim,
            factory=snap.factory,
            use_gpu=False,
            search_params=snap.search_params,
            sha256=snap.index_sha256,
        )
    except (FileNotFoundError, ValueError) as err:
        raise IndexStateError(f"cannot load the index snapshot {path}: {err}; {hint}") from err
    covered = store.snapshot_ids(snap.max_id, snap.removal_seq)
    if not index.ntotal == snap.ntotal == covered.size:
        raise IndexStateError(
            f"index {path} holds {index.ntotal} vectors, its snapshot record says {snap.ntotal}"
            f" and the store had {covered.size} active items then: they do not match; {hint}"
        )
    removed = store.removed_since(snap.removal_seq, snap.max_id)
    ids = covered
    if removed.size:
        gone = np.isin(covered, removed)
        try:
            index.remove_ids(np.flatnonzero(gone))
        except ValueError:  # HNSW and other indexes that cannot remove vectors
            return _build_from_store(store, snap.factory, snap.search_params)
        ids = covered[~gone]
    parts = [ids]
    for new_ids, vectors in store.iter_active(after_id=snap.max_id):
        index.add(vectors)
        parts.append(new_ids)
    return index, np.concatenate(parts)


class IndexedItems:
    """The bundle's mutable search state in a folder: see the module docstring.

    Build with :meth:`create` or :meth:`open`; :meth:`close` (or ``with``) snapshots pending
    changes and releases the folder. ``snapshot_every``: snapshot automatically once at
    least this many vectors were added or removed since the last snapshot AND at least
    ``snapshot_growth`` times ``ntotal`` (so big indexes are not rewritten for small
    changes); ``None`` or 0 snapshots only on :meth:`snapshot` and :meth:`close`.
    """

    def __init__(
        self,
        root: Path,
        store: ItemStore,
        index: EmbeddingIndex,
        ids: np.ndarray,
        lock: IO[Any] | None,
        snapshot_every: int | None,
        snapshot_growth: float,
        read_only: bool = False,
    ) -> None:
        self._root, self._store, self._lock_file = root, store, lock
        self._read_only = read_only
        self._index, self._ids = index, ids  # position p holds the item with id ids[p]
        self._snapshot_every, self._snapshot_growth = snapshot_every or 0, snapshot_growth
        self._mutate = threading.RLock()  # serialises add / remove / snapshot / close
        self._rw = _ReadWriteLock()  # swaps of (index, ids) vs searches
        self._since_snapshot = 0
        self._broken: BaseException | None = None
        self._closed = False

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
        """Create an empty store and index in ``folder`` (made if missing).

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
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock_folder(root)
        try:
            if (root / STORE_FILE).exists():
                raise FileExistsError(f"{root / STORE_FILE} exists: use IndexedItems.open")
            index = EmbeddingIndex(dim, factory, use_gpu=False, search_params=search_params)
            if train_vectors is not None and not index.is_trained:
                index.train(
                    check_vectors(train_vectors, dim, name="train_vectors"), max_train=max_train
                )
            if not index.is_trained:
                raise ValueError(
                    f"a {factory!r} index must be trained: pass train_vectors, a representative "
                    "sample of L2-normalised embeddings"
                )
            sha = index.save(root / INDEX_FILE)  # the store appearing is the commit point
            first = Snapshot(sha, 0, 0, 0, factory, search_params)
            store = ItemStore.create(root / STORE_FILE, dim, initial_snapshot=first)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
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
        """Open ``folder``: load the last index snapshot and replay the store after it.

        Args:
            read_only: open beside a writer (see the module docstring): no folder lock, a
                read-only store connection, nothing written; ``add`` / ``remove`` /
                ``snapshot`` raise :class:`ReadOnlyError`.
            rebuild_index: ignore ``index.faiss`` and build the index from the stored
                vectors (IVF / PQ trained on a sample of them), then snapshot it.
            check: the store's integrity check at open: ``"quick"``, ``"full"``, ``"none"``.

        Raises:
            FileNotFoundError: no ``items.sqlite`` in ``folder``.
            StoreError: the store is not readable (see :meth:`ItemStore.open`).
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
            return cls._open_read_only(root, check)
        lock = _lock_folder(root)
        store: ItemStore | None = None
        try:
            store = ItemStore.open(root / STORE_FILE, check=check)
            snap = store.last_snapshot()
            if snap is None:
                raise IndexStateError(f"{store.path} records no index snapshot")
            with _snapshot_lock(root, exclusive=True):
                _finish_pending(root, snap)
            if rebuild_index:
                damaged = store.check_rows(active_only=True)
                if damaged:
                    raise StoreError(
                        f"cannot rebuild the index of {root}: damaged rows in {store.path}: "
                        f"{'; '.join(damaged)}. Repair them, or mark them removed "
                        f"(ItemStore.open({str(store.path)!r}).remove(ids)), and rebuild again"
                    )
                index, ids = _build_from_store(store, snap.factory, snap.search_params)
            else:
                index, ids = _replay(root, store, snap)
        except BaseException:
            if store is not None:
                store.close()
            if lock is not None:
                lock.close()
            raise
        items = cls(root, store, index, ids, lock, snapshot_every, snapshot_growth)
        replayed = (
            store.max_id - snap.max_id + store.removed_since(snap.removal_seq, snap.max_id).size
        )
        items._since_snapshot = replayed  # close() snapshots them
        if rebuild_index:
            items.snapshot()
        return items

    @classmethod
    def _open_read_only(cls, root: Path, check: Check) -> IndexedItems:
        """:meth:`open` with ``read_only=True``: the store's state and the snapshot it records
        read in one transaction, the snapshot's file loaded under the shared snapshot lock."""
        store = ItemStore.open(root / STORE_FILE, check=check, read_only=True)
        try:
            with _snapshot_lock(root, exclusive=False), store.read_transaction():
                snap = store.last_snapshot()
                if snap is None:
                    raise IndexStateError(f"{store.path} records no index snapshot")
                index, ids = _replay(root, store, snap, _snapshot_file(root, snap))
        except BaseException:
            store.close()
            raise
        return cls(root, store, index, ids, None, None, 0.0, read_only=True)

    @property
    def read_only(self) -> bool:
        """Whether this was opened with ``read_only=True`` (nothing is ever written)."""
        return self._read_only

    @property
    def store(self) -> ItemStore:
        """The item store (read metadata with ``get``; mutate only through this object)."""
        return self._store

    @property
    def folder(self) -> Path:
        """The folder holding ``items.sqlite`` and ``index.faiss``."""
        return self._root

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._store.dim

    @property
    def ntotal(self) -> int:
        """Number of indexed (active) items."""
        return int(self._ids.size)

    @property
    def factory(self) -> str:
        """FAISS factory string of the index."""
        return self._index.factory

    def check_writable(self) -> None:
        """Raise ReadOnlyError when opened read-only (and RuntimeError when closed or broken)."""
        if self._read_only:
            raise ReadOnlyError(
                f"{self._root} was opened read-only: adds, removals and snapshots need the "
                "folder opened for writing (only one process at a time may)"
            )
        self._check_usable()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"IndexedItems({str(self._root)!r}) is closed")
        if self._broken is not None:
            raise RuntimeError(
                f"the index of {self._root} no longer matches its store after a failure "
                f"({self._broken!r}); close and reopen it (the store is intact)"
            )

    def add(
        self,
        records: Sequence[ItemRecord],
        vectors: np.ndarray,
        base_vectors: np.ndarray | None = None,
        dba: tuple[int, float] | None = None,
    ) -> AddResult:
        """Add items: store first (durable when this returns), then the index.

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
            ids = [0] * len(records)  # ids start at 1
            first_of: dict[str, int] = {}  # sha256 -> position of its first record
            fresh: list[int] = []
            repeated: list[int] = []
            for i, record in enumerate(records):
                sha = record.content_sha256
                if sha is None:
                    fresh.append(i)
                elif sha in first_of:
                    repeated.append(i)
                else:
                    first_of[sha] = i
                    found = self._store.find_by_sha256(sha)
                    if found:
                        ids[i] = found[0]
                        repeated.append(i)
                    else:
                        fresh.append(i)
            base = None
            if base_vectors is not None:
                base = check_vectors(base_vectors, self.dim, len(records))[fresh]
            searched = x[fresh]
            if dba is not None and fresh:
                _, pool = self._store.active_base_vectors()
                base = searched
                searched = dba_vectors_for(base, pool, int(dba[0]), float(dba[1]))
            added = self._store.add([records[i] for i in fresh], searched, base)
            for i, new_id in zip(fresh, added, strict=True):
                ids[i] = new_id
            for i in repeated:
                ids[i] = ids[i] or ids[first_of[str(records[i].content_sha256)]]
            if added:
                with self._after_commit(), self._rw.write():
                    self._index.add(searched)
                    self._ids = np.concatenate([self._ids, np.asarray(added, dtype=np.int64)])
                self._after_mutation(len(added))
        return AddResult(ids, added, [(i, ids[i]) for i in repeated])

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Remove items: store first (durable when this returns), then the index.

        HNSW indexes cannot remove vectors: the index is rebuilt from the store's vectors
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
                    index, active = _build_from_store(self._store, self.factory, params)
                    with self._rw.write():
                        self._index, self._ids = index, active
                    rebuilt = True
            self._after_mutation(len(removed), force=rebuilt)
        return removed

    @contextmanager
    def _after_commit(self) -> Iterator[None]:
        """Index changes that follow a store commit: a failure leaves the two unequal, so
        this object refuses further use (reopening replays the store)."""
        try:
            yield
        except BaseException as err:
            self._broken = err
            raise

    def _after_mutation(self, count: int, force: bool = False) -> None:
        """Count changed vectors; snapshot when due. A failed automatic snapshot is logged,
        not raised: the change itself is already durable in the store."""
        self._since_snapshot += count
        due = max(self._snapshot_every, self._snapshot_growth * self._index.ntotal)
        if self._snapshot_every and (force or self._since_snapshot >= due):
            try:
                self._snapshot_locked()
            except Exception:
                log.exception("automatic snapshot of %s failed; will retry", self._root)

    def search(
        self, vectors: np.ndarray, k: int, label: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items for each query, best first, equal scores by ascending id.

        Args:
            vectors: (n, dim) real array of queries (L2-normalised for cosine scores).
            k: >= 1; clamped to :attr:`ntotal` (to the label's indexed items with ``label``).
            label: only items with this label, found through the store's label index: a
                few (up to :data:`EXACT_MAX`, or up to the candidates a deeper search would
                check) are scored exactly from their stored vectors; for many, the index is
                searched deep enough to hold ``k`` of them and only the candidates' rows are
                read. Rows read: O(min(matches, k * ntotal / matches)); none for a label
                nobody has.

        Returns:
            ``(scores, item_ids)``: (n, k') float32 inner products and (n, k') int64 item ids,
            ``k' = min(k, ntotal)`` (0 for an empty index or a label nobody has); -1 (score
            -inf with a label, about -3.4e38 without) where an approximate index found fewer
            than k' neighbours.
        """
        xq = np.asarray(vectors)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {xq.shape}")
        if label is not None:
            return self._search_label(xq, int(k), label)
        with self._rw.read():
            self._check_usable()
            index, ids = self._index, self._ids
            if index.ntotal == 0:
                shape = (xq.shape[0], 0)
                return np.empty(shape, np.float32), np.empty(shape, np.int64)
            scores, positions = index.search(xq, int(k))
        return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def _search_label(self, xq: np.ndarray, k: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` among the items with ``label``: scored exactly when reading their
        rows costs no more than checking the candidates a deeper search would bring."""
        count = self._store.label_count(label)  # counted in the label index: no rows read
        if count and count <= max(EXACT_MAX, 2 * k * self.ntotal // count):
            return self._label_exact(xq, k, label)
        if count:
            return self._label_deeper(xq, min(k, count), label, count)
        shape = (xq.shape[0], 0)
        return np.empty(shape, np.float32), np.empty(shape, np.int64)

    def _label_exact(self, xq: np.ndarray, k: int, label: str) -> tuple[np.ndarray, np.ndarray]:
        """The label's indexed items scored with their stored vectors (O(matches) rows)."""
        wanted = self._store.label_ids(label)
        with self._rw.read():
            self._check_usable()
            ids = self._ids
            pos = np.searchsorted(ids, wanted)  # ids increase with the position
            inside = pos < ids.size
            inside[inside] = ids[pos[inside]] == wanted[inside]  # added but not yet indexed
        members = wanted[inside]
        if members.size == 0:
            shape = (xq.shape[0], 0)
            return np.empty(shape, np.float32), np.empty(shape, np.int64)
        scores = np.ascontiguousarray(xq, dtype=np.float32) @ self._store.vectors_of(members).T
        return _top_k(scores, members, k)

    def _label_deeper(
        self, xq: np.ndarray, k: int, label: str, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index searched for ever more neighbours (at first twice as many as hold ``k``
        of the label's ``count`` items on average) until each row has ``k`` of them or the
        index no more; only the candidates' rows are read. Empty slots: -1, score -inf."""
        out_scores = np.full((xq.shape[0], k), -np.inf, np.float32)
        out_ids = np.full((xq.shape[0], k), -1, np.int64)
        todo = np.arange(xq.shape[0])
        want = max(4 * k, -(-2 * k * self.ntotal // count))
        while todo.size:
            with self._rw.read():
                self._check_usable()
                index, ids = self._index, self._ids
                if index.ntotal == 0:
                    break
                want = min(want, index.ntotal)
                scores, found = index.search(xq[todo], want)
                found = np.where(found >= 0, ids[np.maximum(found, 0)], -1)
                everything = want >= index.ntotal
            members = self._store.with_label(np.unique(found[found >= 0]), label)
            keep = np.isin(found, members)
            done = []
            for row, query in enumerate(todo):
                hits = np.flatnonzero(keep[row])[:k]
                if hits.size == k or everything or bool((found[row] < 0).any()):
                    out_scores[query, : hits.size] = scores[row, hits]
                    out_ids[query, : hits.size] = found[row, hits]
                    done.append(row)
            todo = np.delete(todo, done)
            want *= 4
        return out_scores, out_ids

    def snapshot(self) -> Snapshot:
        """Write the index to ``index.faiss`` and record it (protocol step 2); return it."""
        with self._mutate:
            self.check_writable()
            return self._snapshot_locked()

    def _snapshot_locked(self) -> Snapshot:
        if self._index.ntotal != self._ids.size:
            raise RuntimeError(f"index has {self._index.ntotal} vectors, {self._ids.size} ids")
        store, pending = self._store, self._root / PENDING_FILE
        state = (self._index.ntotal, store.max_id, store.removal_seq)
        sha = self._index.save(pending)  # searches may go on: saving only reads the index
        with _snapshot_lock(self._root, exclusive=True):  # readers never see record != file
            snap = store.record_snapshot(
                Snapshot(sha, *state, self.factory, self._index.search_params)
            )
            os.replace(pending, self._root / INDEX_FILE)
            fsync_dir(self._root)
        self._since_snapshot = 0
        return snap

    def verify(self, sample: int = 100, seed: int = 0) -> list[str]:
        """Problems found, ``[]`` when healthy: store integrity (full check), every stored row
        (:meth:`ItemStore.check_rows`: vector, uri, label, extra of each item and each base
        vector), index size vs active items, position -> id mapping vs the store,
        ``index.faiss`` vs its recorded sha256, and a sample of stored vectors searched: each
        must be among the 10 nearest of its own position (score ~1 for Flat / HNSW-Flat)."""
        if not self._store.path.is_file():
            return [f"item store {self._store.path} is missing"]
        problems = [f"store: {p}" for p in self._store.integrity_check(full=True)]
        problems += self._store.check_rows()
        with self._mutate:
            if self._broken is not None:
                problems.append(f"index does not match the store after {self._broken!r}")
            index, ids, active = self._index, self._ids, self._store.active_ids()
            if index.ntotal != active.size or ids.size != active.size:
                problems.append(
                    f"index holds {index.ntotal} vectors and maps {ids.size} ids, but the store "
                    f"has {active.size} active items"
                )
            elif not np.array_equal(ids, active):
                p = int(np.flatnonzero(ids != active)[0])
                problems.append(f"position {p} maps to id {ids[p]}, the store says {active[p]}")
            problems += self._check_snapshot_file()
            if problems or index.ntotal == 0:
                return problems
            rng = np.random.default_rng(seed)
            pos = np.sort(rng.choice(index.ntotal, size=min(sample, index.ntotal), replace=False))
            scores, found = index.search(self._store.vectors(ids[pos].tolist()), 10)
        exact = re.fullmatch(r"(HNSW\d+|.*Flat)", self.factory.replace(" ", "")) is not None
        for row, p in enumerate(pos):
            hit = np.flatnonzero(found[row] == p)
            if hit.size == 0:
                problems.append(f"item {ids[p]} is not among the nearest of its own vector")
            elif exact and scores[row, hit[0]] < 1 - 1e-3:
                problems.append(f"item {ids[p]} scores {scores[row, hit[0]]:.4f} with itself")
        return problems

    def _check_snapshot_file(self) -> list[str]:
        snap, path = self._store.last_snapshot(), self._root / INDEX_FILE
        if snap is None:
            return ["the store records no index snapshot"]
        if not path.is_file():
            return [f"snapshot file {path} is missing"]
        actual = sha256_file(path)
        if actual != snap.index_sha256:
            return [f"{path} has sha256 {actual}, its snapshot record {snap.index_sha256}"]
        return []

    # the rest of the SearchBackend interface (retrieval.backends) ------------------------
    def get(self, ids: Sequence[int]) -> dict[int, Item]:
        """The active items among ``ids`` by id (unknown and removed ids left out)."""
        wanted = [int(i) for i in ids]
        try:
            found = self._store.get(wanted)
        except KeyError:  # some ids were never stored: keep the others
            found = []
            for item_id in wanted:
                try:
                    found += self._store.get([item_id])
                except KeyError:
                    continue
        return {item.id: item for item in found if item.active}

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), dim) float32 stored vectors (removed items' too); KeyError if unknown."""
        return self._store.vectors(ids)

    def find_by_sha256(self, sha256: str) -> list[int]:
        """Ids of the active items whose image bytes have this sha256, increasing."""
        return self._store.find_by_sha256(sha256)

    def removed_uris(self) -> set[str]:
        """Uris of the removed items (the store keeps their rows)."""
        removed = self._store.removed_since(0, self._store.max_id)
        return {item.uri for item in self._store.get(removed.tolist())}

    def describe(self) -> dict[str, Any]:
        """The bundle's own FAISS index and item store."""
        return {
            "kind": "bundle",
            "path": str(self._root),
            "factory": self.factory,
            "search_params": self._index.search_params,
            "metric": "IP",
        }

    def close(self) -> None:
        """Snapshot unsaved changes, close the store and release the folder (idempotent)."""
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

    def __repr__(self) -> str:
        return f"IndexedItems({str(self._root)!r}, ntotal={self.ntotal}, factory={self.factory!r})"

"""IndexedItems: an :class:`~retrieval.bundle.item_table.ItemTable` and the FAISS index over
its active items, kept equal, in a folder (``items.sqlite``, ``index.faiss`` and ``.lock``,
the writer's lock).

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
searches run concurrently from any number of threads; ``add`` / ``remove`` / ``snapshot``
are serialised. A search holds the index and the mapping under the read side of a
readers-writer lock, so it sees either the state before a change or after it; ``verify``
holds the lock that serialises changes. The index lives on the CPU (FAISS GPU indexes are not
thread-safe even for reads).

Searching the items of one label: a few are scored exactly from their stored vectors; for
many, the index is searched ever deeper and only the candidates' rows are read. Results
follow the house rule: best first, equal scores by ascending id.

A folder of items on disk: ``items.sqlite`` (the :class:`ItemTable`), ``index.faiss`` (the
last index snapshot) and ``.lock``, the writer's lock; the table and the index opened, or
created, together.

One process at a time may open a folder for writing (an exclusive ``flock`` on ``.lock``;
POSIX only). Any number of others may open it read-only beside that writer: no lock, a
read-only table connection, the index loaded as :func:`load_index_read_only` says. Either way
the index file must be what the factory string its snapshot record names builds.

An item's uri is an absolute path, or a path relative to the folder that stays inside it
(:func:`item_path`); :func:`check_item_uris` finds active items whose uri leads out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from retrieval.bundle import item_table
from retrieval.bundle.format import BundleBusyError, BundleError, ReadOnlyError
from retrieval.bundle.item_table import Check, ItemTable
from retrieval.bundle.records import (
    AddResult,
    Item,
    ItemRecord,
    Snapshot,
    check_vectors,
    listed,
    plan_add,
)
from retrieval.bundle.snapshot import (
    INDEX_FILE,
    IndexStateError,
    build_from_table,
    load_index,
    load_index_read_only,
    snapshot_file_problems,
    write_snapshot,
)
from retrieval.index import EmbeddingIndex
from retrieval.infra.locks import LockHeldError, ReadWriteLock, hold_exclusive
from retrieval.infra.ties import top_k_columns
from retrieval.postprocess.steps import dba_vectors_for

if TYPE_CHECKING:
    from retrieval.bundle.item_table import ItemTable
    from retrieval.index import EmbeddingIndex

__all__ = [
    "EXACT_MAX",
    "IndexedItems",
    "LOCK_FILE",
    "STORE_FILE",
    "View",
    "check_item_uris",
    "create_folder",
    "item_path",
    "lock_folder",
    "open_folder",
    "open_folder_read_only",
    "search_label",
    "top_k",
]


log = logging.getLogger(__name__)


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
        store: ItemTable,
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
        self._rw = ReadWriteLock()  # swaps of (index, ids) vs searches
        self._since_snapshot = 0
        self._broken: BaseException | None = None
        self._closed = False

    @property
    def read_only(self) -> bool:
        """Whether this was opened with ``read_only=True`` (nothing is ever written)."""
        return self._read_only

    @property
    def store(self) -> ItemTable:
        """The item table (read metadata with ``get``; mutate only through this object)."""
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

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"IndexedItems({str(self._root)!r}) is closed")
        if self._broken is not None:
            raise RuntimeError(
                f"the index of {self._root} no longer matches its store after a failure "
                f"({self._broken!r}); close and reopen it (the store is intact)"
            )

    @contextmanager
    def _view(self) -> Iterator[tuple[EmbeddingIndex, np.ndarray]]:
        """The index and its position -> id array, unchanged during the block."""
        with self._rw.read():
            self._check_usable()
            yield self._index, self._ids

    def search(
        self, vectors: np.ndarray, k: int, label: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items for each query, best first, equal scores by ascending id.

        Args:
            vectors: (n, dim) real array of queries (L2-normalised for cosine scores).
            k: >= 1; clamped to :attr:`ntotal` (to the label's indexed items with ``label``).
            label: only items with this label, found through the table's label index: a
                few (up to :data:`~retrieval.bundle.items.EXACT_MAX`, or up to the
                candidates a deeper search would check) are scored exactly from their stored
                vectors; for many, the index is searched deep enough to hold ``k`` of them
                and only the candidates' rows are read. Rows read: O(min(matches, k * ntotal
                / matches)); none for a label nobody has.

        Returns:
            ``(scores, item_ids)``: (n, k') float32 inner products and (n, k') int64 item ids,
            ``k' = min(k, ntotal)`` (0 for an empty index or a label nobody has); -1 (score
            -inf with a label, about -3.4e38 without) where an approximate index found fewer
            than k' neighbours.
        """
        xq = np.asarray(vectors)
        if label is not None:
            return search_label(xq, int(k), label, self._store, self.ntotal, self._view)
        with self._view() as (index, ids):
            if index.ntotal == 0:
                shape = (xq.shape[0], 0)
                return np.empty(shape, np.float32), np.empty(shape, np.int64)
            scores, positions = index.search(xq, int(k))
        return scores, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def verify(self, sample: int = 100, seed: int = 0) -> list[str]:
        """Problems found, ``[]`` when healthy: table integrity (full check), every stored row
        (:meth:`ItemTable.check_rows`: vector, uri, label, extra of each item and each base
        vector), index size vs active items, position -> id mapping vs the table,
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
            problems += snapshot_file_problems(self._root, self._store)
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

    def hit_records(self, ids: Sequence[int]) -> dict[int, Item]:
        """:meth:`get`: the store is local, a second read costs nothing."""
        return self.get(ids)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), dim) float32 stored vectors (removed items' too); KeyError if unknown."""
        return self._store.vectors(ids)

    def find_by_sha256(self, sha256: str) -> list[int]:
        """Ids of the active items whose image bytes have this sha256, increasing."""
        return self._store.find_by_sha256(sha256)

    def removed_uris(self) -> set[str]:
        """Uris of the removed items (the table keeps their rows)."""
        removed = self._store.removed_since(0, self._store.max_id)
        return {item.uri for item in self._store.get(removed.tolist())}

    def describe(self) -> dict[str, Any]:
        """The bundle's own FAISS index and item table."""
        return {
            "kind": "bundle",
            "path": str(self._root),
            "factory": self.factory,
            "search_params": self._index.search_params,
            "metric": "IP",
        }

    def __repr__(self) -> str:
        return f"IndexedItems({str(self._root)!r}, ntotal={self.ntotal}, factory={self.factory!r})"

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


#: label filters matching at most this many items score them exactly from their stored
#: vectors (O(matches) rows read); more are found by searching the index ever deeper
EXACT_MAX = 1024


#: a consistent view of the index and its position -> id array, held for the block
View = Callable[[], AbstractContextManager[tuple["EmbeddingIndex", np.ndarray]]]


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row of ``scores`` (nq, m) over the increasing ``ids`` (m,),
    equal scores by ascending id: (nq, min(k, m)) scores and ids."""
    columns = top_k_columns(scores, k)  # ascending column is ascending id here
    return np.take_along_axis(scores, columns, axis=1), ids[columns]


def _empty(nq: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)


def search_label(
    xq: np.ndarray, k: int, label: str, table: ItemTable, ntotal: int, view: View
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of the indexed items with ``label`` for each query of ``xq``, among
    ``ntotal`` indexed items: scored exactly when reading their rows costs no more than
    checking the candidates a deeper search would bring."""
    count = table.label_count(label)  # counted in the label index: no rows read
    if count and count <= max(EXACT_MAX, 2 * k * ntotal // count):
        return _label_exact(xq, k, label, table, view)
    if count:
        return _label_deeper(xq, min(k, count), label, count, ntotal, table, view)
    return _empty(xq.shape[0])


def _label_exact(
    xq: np.ndarray, k: int, label: str, table: ItemTable, view: View
) -> tuple[np.ndarray, np.ndarray]:
    """The label's indexed items scored with their stored vectors (O(matches) rows)."""
    wanted = table.label_ids(label)
    with view() as (_, ids):
        pos = np.searchsorted(ids, wanted)  # ids increase with the position
        inside = pos < ids.size
        inside[inside] = ids[pos[inside]] == wanted[inside]  # added but not yet indexed
    members = wanted[inside]
    if members.size == 0:
        return _empty(xq.shape[0])
    scores = np.ascontiguousarray(xq, dtype=np.float32) @ table.vectors_of(members).T
    return top_k(scores, members, k)


def _label_deeper(
    xq: np.ndarray, k: int, label: str, count: int, ntotal: int, table: ItemTable, view: View
) -> tuple[np.ndarray, np.ndarray]:
    """The index searched for ever more neighbours (at first twice as many as hold ``k``
    of the label's ``count`` items on average) until each row has ``k`` of them or the
    index no more; only the candidates' rows are read. Empty slots: -1, score -inf."""
    out_scores = np.full((xq.shape[0], k), -np.inf, np.float32)
    out_ids = np.full((xq.shape[0], k), -1, np.int64)
    todo = np.arange(xq.shape[0])
    want = max(4 * k, -(-2 * k * ntotal // count))
    while todo.size:
        with view() as (index, ids):
            if index.ntotal == 0:
                break
            want = min(want, index.ntotal)
            scores, found = index.search(xq[todo], want)
            found = np.where(found >= 0, ids[np.maximum(found, 0)], -1)
            everything = want >= index.ntotal
        members = table.with_label(np.unique(found[found >= 0]), label)
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


STORE_FILE = "items.sqlite"


LOCK_FILE = ".lock"


def _leaves_folder(uri: str) -> bool:
    """Whether the relative ``uri`` names a path outside its folder (``..`` past the top)."""
    return os.path.normpath(uri).split(os.sep, 1)[0] == os.pardir


def item_path(root: Path, uri: str) -> Path:
    """The file the item ``uri`` of the folder ``root`` names: an absolute path as it is, a
    relative one under ``root``. Raises BundleError for a relative uri that leads outside
    ``root`` (``../x.jpg``, ``a/../../x.jpg``)."""
    path = Path(uri)
    if path.is_absolute():
        return path
    if _leaves_folder(uri):
        raise BundleError(f"item uri {uri!r} names a file outside {root}")
    return root / path


def check_item_uris(root: Path) -> None:
    """Refuse a folder whose ``items.sqlite`` holds active items whose relative uri leads
    outside ``root`` (see :func:`item_path`). Reads the uris of the items whose uri holds
    ``..`` over a read-only connection of its own.

    Raises:
        BundleError: naming the file and the ids, and the way out.
    """
    store = root / STORE_FILE
    sql = "SELECT id, uri FROM items WHERE removed_seq IS NULL AND instr(uri, '..') ORDER BY id"
    with contextlib.closing(item_table.connect(store, read_only=True)) as conn:
        rows = conn.execute(sql).fetchall()
    ids = [i for i, uri in rows if not Path(uri).is_absolute() and _leaves_folder(uri)]
    if ids:
        raise BundleError(
            f"{store}: items whose uri names a file outside {root} (through '..'): "
            f"{listed(ids)}; the item table was altered: remove them "
            f"(IndexedItems.open({str(root)!r}).remove(ids)) or re-export the bundle"
        )


def _check_index_file(root: Path, index: EmbeddingIndex) -> None:
    """Refuse an index whose file is not what its recorded factory string builds."""
    problem = index.structure_mismatch(index.factory)
    if problem:
        raise IndexStateError(
            f"{root / INDEX_FILE} {problem}, which {root / STORE_FILE} records for it: one of "
            f"them was altered; IndexedItems.open({str(root)!r}, rebuild_index=True) builds "
            "the index again from the stored vectors"
        )


def lock_folder(root: Path) -> IO[Any] | None:
    """Hold an exclusive ``flock`` on ``root/.lock`` (None where fcntl does not exist) until
    the returned handle is closed. Raises BundleBusyError when another writer holds it."""
    try:
        return hold_exclusive(root / LOCK_FILE)
    except LockHeldError as err:
        raise BundleBusyError(
            f"{root} is already open for writing (in this or another process, e.g. retrieval "
            "serve or retrieval index): searches can run beside it (read-only); adds and "
            "removals go through that process, or wait until it stops"
        ) from err.__cause__


def create_folder(
    root: Path,
    dim: int,
    factory: str,
    search_params: str,
    train_vectors: np.ndarray | None,
    max_train: int,
) -> tuple[ItemTable, EmbeddingIndex, IO[Any] | None]:
    """An empty table and index in ``root`` (made if missing), the index trained on up to
    ``max_train`` of ``train_vectors`` where it needs training, and the writer's lock held.
    The table appearing is the commit point: it records the index file written before it.

    Raises:
        FileExistsError: ``root`` already has an ``items.sqlite``. ValueError: bad ``dim`` /
            factory / search_params, or an index that needs (more) ``train_vectors``.
    """
    root.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(root)
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
        sha = index.save(root / INDEX_FILE)
        first = Snapshot(sha, 0, 0, 0, factory, search_params)
        table = ItemTable.create(root / STORE_FILE, dim, initial_snapshot=first)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return table, index, lock


def open_folder(
    root: Path, check: Check, rebuild: bool
) -> tuple[ItemTable, Snapshot, EmbeddingIndex, np.ndarray, IO[Any] | None]:
    """The writer's table of ``root``, its last snapshot, the index brought up to the table's
    state (see :func:`load_index`) with its position -> id array, and the writer's lock held.
    Nothing stays open when it raises."""
    lock = lock_folder(root)
    table: ItemTable | None = None
    try:
        table = ItemTable.open(root / STORE_FILE, check=check)
        snap, index, ids = load_index(root, table, rebuild)
        _check_index_file(root, index)
    except BaseException:
        if table is not None:
            table.close()
        if lock is not None:
            lock.close()
        raise
    return table, snap, index, ids, lock


def open_folder_read_only(root: Path, check: Check) -> tuple[ItemTable, EmbeddingIndex, np.ndarray]:
    """A reader's table of ``root`` (a read-only connection), the index and its position -> id
    array (see :func:`load_index_read_only`). Nothing stays open when it raises."""
    table = ItemTable.open(root / STORE_FILE, check=check, read_only=True)
    try:
        index, ids = load_index_read_only(root, table)
        _check_index_file(root, index)
    except BaseException:
        table.close()
        raise
    return table, index, ids

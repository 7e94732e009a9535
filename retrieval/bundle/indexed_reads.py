"""The read side of :class:`~retrieval.bundle.items.IndexedItems`: searches (any number of
threads at once) and item reads over its FAISS index, its position -> id mapping and its
:class:`~retrieval.bundle.item_table.ItemTable`.

A search holds the index and the mapping under the read side of a readers-writer lock, so it
sees either the state before a change or after it; ``verify`` holds the lock that serialises
changes. The index lives on the CPU (FAISS GPU indexes are not thread-safe even for reads).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.label_search import search_label
from retrieval.bundle.records import Item
from retrieval.bundle.snapshot import snapshot_file_problems
from retrieval.index import EmbeddingIndex
from retrieval.infra.locks import ReadWriteLock

__all__ = ["IndexedReads"]


class IndexedReads:
    """Searches and reads of the items of a folder (see
    :class:`~retrieval.bundle.items.IndexedItems`, which adds opening, changes and snapshots)."""

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
                few (up to :data:`~retrieval.bundle.label_search.EXACT_MAX`, or up to the
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

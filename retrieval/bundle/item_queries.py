"""Reading the item table: items and vectors by id, by label, by sha256, the active ids and
the ids active at a snapshot's state. :class:`ItemQueries` holds the connection; every call
is serialised by its lock (one connection shared by all threads)."""

from __future__ import annotations

import json
import operator
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.bundle.item_checks import blob_problems, listed
from retrieval.bundle.item_schema import BATCH
from retrieval.bundle.records import Item, StoreError
from retrieval.infra.checks import positive_int

__all__ = ["ItemQueries"]


class ItemQueries:
    """The read queries of :class:`~retrieval.bundle.item_table.ItemTable` over one open
    connection to the file at ``path`` holding ``dim``-d vectors."""

    def __init__(self, conn: sqlite3.Connection, path: Path, dim: int) -> None:
        self._conn, self._path, self._dim = conn, path, dim
        self._lock = threading.RLock()
        self._read_only = False

    @contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Every read of this thread inside sees one state of the store, whatever another
        process commits meanwhile (an SQLite read transaction; WAL keeps writers going)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._dim

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()[0]

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _ids(self, sql: str, params: Sequence[Any] = ()) -> np.ndarray:
        return np.array([r[0] for r in self._fetch(sql, params)], dtype=np.int64)

    def _states(self, ids: Sequence[int]) -> dict[int, int | None]:
        """removed_seq of each known id among ``ids``."""
        found: dict[int, int | None] = {}
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT id, removed_seq FROM items WHERE id IN ({marks})", chunk
            ).fetchall()
            found.update(rows)
        return found

    def _chunks(self, sql: str, size: int) -> Iterator[list[Any]]:
        """The rows of ``sql`` (``id > ? ... ORDER BY id LIMIT ?``, id first), chunk by chunk."""
        last = 0
        while True:
            rows = self._fetch(sql, (last, size))
            if not rows:
                return
            yield rows
            last = int(rows[-1][0])

    def _has_base_vectors(self) -> bool:
        return bool(
            self._fetch(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'base_vectors'"
            )
        )

    @property
    def active_count(self) -> int:
        """Number of items not removed."""
        return int(self._one("SELECT COUNT(*) FROM items WHERE removed_seq IS NULL"))

    @property
    def max_id(self) -> int:
        """Largest id ever assigned (0 for an empty store)."""
        return int(self._one("SELECT COALESCE(MAX(id), 0) FROM items"))

    @property
    def removal_seq(self) -> int:
        """Sequence number of the latest removal (0 before any)."""
        return int(self._one("SELECT COALESCE(MAX(seq), 0) FROM removals"))

    def get(self, ids: Sequence[int]) -> list[Item]:
        """Items by id, in the order asked (removed ones included, see :attr:`Item.active`).

        Raises:
            KeyError: ids the store never had (listed).
        """
        wanted = [operator.index(i) for i in ids]
        rows: dict[int, Item] = {}
        with self._lock:
            for start in range(0, len(wanted), BATCH):
                chunk = wanted[start : start + BATCH]
                marks = ",".join("?" * len(chunk))
                for row in self._conn.execute(
                    "SELECT id, uri, label, extra, content_sha256, added_at, removed_seq, vector"
                    f" FROM items WHERE id IN ({marks})",
                    chunk,
                ):
                    item_id, uri, label, extra, sha, added_at, removed_seq, blob = row
                    vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
                    rows[item_id] = Item(
                        item_id, uri, label, json.loads(extra), sha, added_at, removed_seq, vec
                    )
        unknown = sorted({i for i in wanted if i not in rows})
        if unknown:
            raise KeyError(f"unknown item ids in {self._path}: {listed(unknown)}")
        return [rows[i] for i in wanted]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), dim) float32 vectors of ``ids`` in the order asked. Raises KeyError."""
        items = self.get(ids)
        out = np.empty((len(items), self._dim), dtype=np.float32)
        for row, item in enumerate(items):
            out[row] = item.vector
        return out

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) float32 vectors of ``ids`` (increasing, known) in that order: only
        the vector column is read. Raises KeyError for ids the store never had."""
        wanted = np.asarray(ids, dtype=np.int64)
        out = np.empty((wanted.size, self._dim), dtype=np.float32)
        with self._lock:
            for start in range(0, wanted.size, BATCH):
                chunk = wanted[start : start + BATCH].tolist()
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT id, vector FROM items WHERE id IN ({marks}) ORDER BY id", chunk
                ).fetchall()
                if [r[0] for r in rows] != chunk:
                    missing = sorted(set(chunk) - {r[0] for r in rows})
                    raise KeyError(f"unknown item ids in {self._path}: {listed(missing)}")
                buf = b"".join(r[1] for r in rows)
                out[start : start + len(chunk)] = np.frombuffer(buf, "<f4").reshape(-1, self._dim)
        return out

    def active_base_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, vectors)`` of the active items that have base vectors (see :meth:`add`),
        in id order: (m,) int64 and (m, dim) float32; empty when the store keeps none."""
        with self._lock:
            has = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'base_vectors'"
            ).fetchone()
            rows = []
            if has:
                rows = self._conn.execute(
                    "SELECT b.id, b.vector FROM base_vectors b JOIN items i ON i.id = b.id"
                    " WHERE i.removed_seq IS NULL ORDER BY b.id"
                ).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        buf = b"".join(r[1] for r in rows)
        return ids, np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(-1, self._dim)

    def find_by_sha256(self, sha256: str) -> list[int]:
        """Ids of the active items whose image bytes have this sha256, in id order."""
        rows = self._fetch(
            "SELECT id FROM items WHERE content_sha256 = ? AND removed_seq IS NULL ORDER BY id",
            (sha256.lower(),),
        )
        return [int(r[0]) for r in rows]

    def active_ids(self) -> np.ndarray:
        """(active_count,) int64 ids of the active items, increasing."""
        return self._ids("SELECT id FROM items WHERE removed_seq IS NULL ORDER BY id")

    def snapshot_ids(self, max_id: int, removal_seq: int) -> np.ndarray:
        """Ids, increasing, active when the store's state was (``max_id``, ``removal_seq``)."""
        return self._ids(
            "SELECT id FROM items WHERE id <= ? AND (removed_seq IS NULL OR removed_seq > ?)"
            " ORDER BY id",
            (max_id, removal_seq),
        )

    def removed_since(self, removal_seq: int, max_id: int) -> np.ndarray:
        """Ids ``<= max_id`` removed after removal ``removal_seq``, increasing."""
        return self._ids(
            "SELECT id FROM items WHERE removed_seq > ? AND id <= ? ORDER BY id",
            (removal_seq, max_id),
        )

    def iter_active(
        self, chunk_size: int = 10_000, after_id: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Active items with ``id > after_id`` in id order, ``chunk_size`` at a time.

        Yields:
            ``(ids, vectors)``: (m,) int64 and (m, dim) float32, ``1 <= m <= chunk_size``.
            Each chunk is its own query: items added or removed meanwhile may or may not
            be seen.
        """
        positive_int(chunk_size, "chunk_size")
        last = int(after_id)
        while True:
            rows = self._fetch(
                "SELECT id, vector FROM items WHERE removed_seq IS NULL AND id > ?"
                " ORDER BY id LIMIT ?",
                (last, chunk_size),
            )
            if not rows:
                return
            bad: dict[str, list[int]] = {}
            blob_problems("items", rows, self._dim, bad)
            if bad:
                raise StoreError(
                    f"{self._path} holds damaged vectors: "
                    + "; ".join(f"{what}: {listed(ids)}" for what, ids in bad.items())
                )
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            buf = b"".join(r[1] for r in rows)
            yield ids, np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(-1, self._dim)
            last = int(ids[-1])

    def label_ids(self, label: str) -> np.ndarray:
        """(m,) int64 ids of the active items with ``label``, increasing; O(m) through the
        label index."""
        return self._ids(
            "SELECT id FROM items WHERE label = ? AND removed_seq IS NULL ORDER BY id", (label,)
        )

    def label_count(self, label: str) -> int:
        """Number of active items with ``label``, counted in the label index (no row read)."""
        return int(
            self._one(
                "SELECT COUNT(*) FROM items WHERE label = ? AND removed_seq IS NULL", (label,)
            )
        )

    def with_label(self, ids: np.ndarray, label: str) -> np.ndarray:
        """The ids among ``ids`` of active items with ``label``, increasing (rows read: those
        of ``ids``, found by id)."""
        wanted = np.asarray(ids, dtype=np.int64).tolist()
        found: list[int] = []
        with self._lock:
            for start in range(0, len(wanted), BATCH):
                chunk = wanted[start : start + BATCH]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(  # by rowid, not through the label index
                    f"SELECT id, label, removed_seq FROM items WHERE id IN ({marks})", chunk
                ).fetchall()
                found += [r[0] for r in rows if r[1] == label and r[2] is None]
        return np.array(sorted(found), dtype=np.int64)

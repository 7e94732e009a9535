"""ItemTable: the bundle's durable item table in SQLite (``items.sqlite``, laid out as
:mod:`retrieval.bundle.item_schema` says), on disk on every commit.

The database runs in WAL mode with ``synchronous=FULL``: a method that writes returns only
after its single transaction is on disk, so a process killed right after it loses nothing.
:meth:`ItemTable.check_rows` reads every row to find damage that SQLite's own checks cannot
see (a vector of the right length that is not a unit vector, a uri with control characters,
an ``extra`` that is not a JSON object). Thread safety: one connection shared by all threads,
every call serialised by a lock. The read queries are those of
:class:`~retrieval.bundle.item_queries.ItemQueries`.
"""

from __future__ import annotations

import errno
import json
import logging
import operator
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from retrieval.bundle import item_schema as schema
from retrieval.bundle.item_checks import blob_problems, check_vectors, listed, row_problems
from retrieval.bundle.item_queries import ItemQueries
from retrieval.bundle.records import ItemRecord, StoreError
from retrieval.bundle.snapshot import Snapshot
from retrieval.infra.checks import positive_int

__all__ = ["Check", "ItemTable"]
Check = Literal["quick", "full", "none"]
log = logging.getLogger(__name__)


class ItemTable(ItemQueries):
    """The item table of a bundle: see the module docstring. Build with :meth:`create` or
    :meth:`open`; close with :meth:`close` (or use as a context manager)."""

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], dim: int, initial_snapshot: Snapshot | None = None
    ) -> ItemTable:
        """Create an empty store at ``path`` (all-or-nothing: built beside it, then linked).

        ``initial_snapshot`` (of an empty index: ``ntotal == max_id == removal_seq == 0``)
        is recorded in the same step, so such a store never exists without it.

        Raises:
            FileExistsError: ``path`` exists. ValueError: ``dim`` is not a positive int, or
                ``initial_snapshot`` is not empty.
        """
        dest = Path(path)
        positive_int(dim, "dim")
        if dest.exists():
            raise FileExistsError(f"cannot create an item store at {dest}: the file exists")
        first = initial_snapshot
        if first is not None and (first.ntotal, first.max_id, first.removal_seq) != (0, 0, 0):
            raise ValueError(f"initial_snapshot must be of an empty index, got {first}")
        schema.create_file(dest, dim, first)
        return cls.open(dest, check="none")

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], check: Check = "quick", read_only: bool = False
    ) -> ItemTable:
        """Open the store at ``path``; ``check`` is ``"quick"`` (``PRAGMA quick_check``),
        ``"full"`` (``integrity_check``) or ``"none"``. ``read_only``: a read-only connection
        (beside a writer in another process; writes then fail with a StoreError).

        Raises:
            FileNotFoundError: no file at ``path``.
            StoreError: not an SQLite database, not an item store, another schema version,
                or a failed integrity check. Messages name the file.
        """
        if check not in ("quick", "full", "none"):
            raise ValueError(f"check must be 'quick', 'full' or 'none', got {check!r}")
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"no item store at {src}")
        with open(src, "rb") as f:
            if f.read(16) != schema.SQLITE_MAGIC:
                raise StoreError(f"{src} is not an SQLite database (wrong file header)")
        try:
            conn = schema.connect(src, read_only)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open the item store {src}: {err}") from err
        try:
            dim = schema.read_meta(conn, src)
            store = cls(conn, src, dim)
            store._read_only = read_only
            if check != "none":
                problems = store.integrity_check(full=check == "full")
                if problems:
                    raise StoreError(
                        f"item store {src} failed its integrity check: {problems}"
                        + store._rows_named_after_failure()
                    )
            store._ensure_label_index()
        except sqlite3.DatabaseError as err:
            conn.close()
            raise StoreError(f"item store {src} is damaged: {err}") from err
        except BaseException:
            conn.close()
            raise
        return store

    def _rows_named_after_failure(self) -> str:
        """The damaged rows, when a failed integrity check still lets them be read."""
        try:
            rows = self.check_rows()
        except sqlite3.DatabaseError:
            return ""
        return f"; damaged rows: {rows}" if rows else ""

    def _ensure_label_index(self) -> None:
        """Create the label index of stores written before it (a one-time O(n log n) pass).
        A store that cannot be written keeps working: label look-ups then scan the table."""
        with self._lock:
            has = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'items_by_label'"
            ).fetchone()
            if has or self._read_only:  # a reader scans; the writer adds the index
                return
            try:
                self._conn.execute(schema.LABEL_INDEX)
            except sqlite3.OperationalError as err:  # read-only file or folder
                log.warning(
                    "cannot add the label index to %s (%s): label filters scan it", self._path, err
                )

    def add(
        self, records: Sequence[ItemRecord], vectors: Any, base_vectors: Any = None
    ) -> list[int]:
        """Insert one item per record in ONE transaction, on disk before returning.

        Args:
            records: n :class:`ItemRecord`. vectors: (n, dim) L2-normalised real array.
            base_vectors: (n, dim) vectors the searched ``vectors`` were derived from (the
                model's, before database-side augmentation), kept in the ``base_vectors``
                table so that items added later can be augmented against them.

        Returns:
            The new ids, in record order (increasing).

        Raises:
            ValueError / TypeError: bad records or vectors; nothing is written.
            OSError: ``errno.ENOSPC`` when the disk is full; nothing is written.
        """
        if any(not isinstance(r, ItemRecord) for r in records):
            raise TypeError("records must be ItemRecord instances")
        x = check_vectors(vectors, self._dim, len(records)).astype("<f4", copy=False)
        base = None
        if base_vectors is not None:
            base = check_vectors(base_vectors, self._dim, len(records)).astype("<f4", copy=False)
        now, ids = schema.now(), []
        with self._lock, self._transaction():
            if base is not None:
                self._conn.execute(schema.BASE_TABLE.format(nbytes=4 * self._dim))
            for row, (r, v) in enumerate(zip(records, x, strict=True)):
                extra = json.dumps(dict(r.extra), sort_keys=True, allow_nan=False)
                cur = self._conn.execute(
                    "INSERT INTO items (content_sha256, uri, label, added_at, extra, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (r.content_sha256, r.uri, r.label, now, extra, v.tobytes()),
                )
                ids.append(int(cur.lastrowid or 0))
                if base is not None:
                    self._conn.execute(
                        "INSERT INTO base_vectors (id, vector) VALUES (?, ?)",
                        (ids[-1], base[row].tobytes()),
                    )
        return ids

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Mark items removed (one new removal sequence number), on disk before returning.

        Returns:
            The distinct removed ids, sorted. An empty ``ids`` changes nothing.

        Raises:
            KeyError: ids the store never had. ValueError: ids already removed. Either way
                nothing is changed; the message lists the ids.
        """
        wanted = sorted({operator.index(i) for i in ids})
        if not wanted:
            return []
        with self._lock, self._transaction():
            states = self._states(wanted)
            unknown = [i for i in wanted if i not in states]
            if unknown:
                raise KeyError(f"unknown item ids in {self._path}: {listed(unknown)}")
            gone = [i for i in wanted if states[i] is not None]
            if gone:
                raise ValueError(f"items already removed in {self._path}: {listed(gone)}")
            seq = self._conn.execute(
                "INSERT INTO removals (removed_at) VALUES (?)", (schema.now(),)
            ).lastrowid
            for start in range(0, len(wanted), schema.BATCH):
                chunk = wanted[start : start + schema.BATCH]
                marks = ",".join("?" * len(chunk))
                self._conn.execute(
                    f"UPDATE items SET removed_seq = ? WHERE id IN ({marks})", [seq, *chunk]
                )
        return wanted

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (the caller holds the lock), committed when the block ends
        and rolled back when it raises. SQLite rolls back by itself on some errors (a full
        disk among them): the error that caused it is raised, never the failed rollback's. A
        full disk is raised as OSError(ENOSPC) naming the file (nothing was written)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as err:
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error as failed:
                    log.error("rolling back a write to %s failed: %s", self._path, failed)
            full = getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            if isinstance(err, sqlite3.OperationalError) and full:
                raise OSError(errno.ENOSPC, str(err), str(self._path)) from err
            raise

    def record_snapshot(self, snapshot: Snapshot) -> Snapshot:
        """Record an index file written for the store's state (durable); return it with its
        ``id`` and ``created_at``. Raises ValueError for a state the store never reached."""
        with self._lock:
            if snapshot.max_id > self.max_id or snapshot.removal_seq > self.removal_seq:
                raise ValueError(f"snapshot {snapshot} is ahead of the store {self._path}")
            done = replace(snapshot, created_at=schema.now())
            return replace(done, id=schema.insert_snapshot(self._conn, done))

    def last_snapshot(self) -> Snapshot | None:
        """The most recently recorded snapshot, or None."""
        rows = self._fetch(
            "SELECT index_sha256, ntotal, max_id, removal_seq, factory, search_params,"
            " created_at, id FROM snapshots ORDER BY id DESC LIMIT 1"
        )
        return Snapshot(*rows[0]) if rows else None

    def integrity_check(self, full: bool = True) -> list[str]:
        """Problems found by ``PRAGMA integrity_check`` (``quick_check`` when not ``full``)
        and ``PRAGMA foreign_key_check``; ``[]`` when healthy."""
        pragma = "integrity_check" if full else "quick_check"
        problems = [r[0] for r in self._fetch(f"PRAGMA {pragma}") if r[0] != "ok"]
        problems += [f"foreign key: {r}" for r in self._fetch("PRAGMA foreign_key_check")]
        return problems

    def check_rows(self, chunk_size: int = 10_000, active_only: bool = False) -> list[str]:
        """Problems in the stored rows, ``[]`` when every one is well-formed: each item's
        vector (a BLOB of ``4 * dim`` bytes, finite, unit norm), uri (text, no control
        characters, at most 4096 characters), label (null or such text), extra (a JSON
        object) and sha256; each ``base_vectors`` row's vector likewise. Every row is read,
        ``chunk_size`` at a time, so memory stays bounded. One message per kind of damage,
        naming the file, the table and the ids. ``active_only``: skip removed items."""
        positive_int(chunk_size, "chunk_size")
        bad: dict[str, list[int]] = {}
        active = " AND i.removed_seq IS NULL" if active_only else ""
        sql = (
            "SELECT i.id, i.uri, i.label, i.extra, i.content_sha256, i.vector FROM items i"
            f" WHERE i.id > ?{active} ORDER BY i.id LIMIT ?"
        )
        for rows in self._chunks(sql, chunk_size):
            for item_id, uri, label, extra, sha, _ in rows:
                for kind in row_problems(uri, label, extra, sha):
                    bad.setdefault(f"items: {kind}", []).append(item_id)
            blob_problems("items", rows, self._dim, bad)
        if self._has_base_vectors():
            sql = (
                "SELECT b.id, b.vector FROM base_vectors b JOIN items i ON i.id = b.id"
                f" WHERE b.id > ?{active} ORDER BY b.id LIMIT ?"
            )
            for rows in self._chunks(sql, chunk_size):
                blob_problems("base_vectors", rows, self._dim, bad)
        return [f"{self._path} {what}: {listed(ids)}" for what, ids in bad.items()]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ItemTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ItemTable({str(self._path)!r}, dim={self._dim})"

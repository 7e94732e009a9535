"""ItemTable: the bundle's durable item table in SQLite (``items.sqlite``), on disk on every
commit.

Tables: ``meta`` (schema version, dim); ``removals`` (one sequence number per removal);
``items`` (one row per vector ever added: id, ``AUTOINCREMENT`` so never reused, uri, label,
extra JSON fields, sha256 of the image bytes, the float32 vector searched and, once removed,
the sequence number of its removal); ``snapshots`` (each index file written, see
:mod:`retrieval.bundle.snapshot`); with database-side augmentation, ``base_vectors`` (each
item's un-augmented vector). An index on ``(label, removed_seq)`` finds a label's items in
O(matches) (stores created before it get it when first opened; the schema version did not
change, as an added index is readable by older software). A file is created all-or-nothing:
built beside its destination, then linked.

The database runs in WAL mode with ``synchronous=FULL``: a method that writes returns only
after its single transaction is on disk, so a process killed right after it loses nothing.
:meth:`ItemTable.check_rows` reads every row to find damage that SQLite's own checks cannot
see (a vector of the right length that is not a unit vector, a uri with control characters,
an ``extra`` that is not a JSON object). Thread safety: one connection shared by all threads,
every call serialised by a lock. Reads: items and vectors by id, by label, by sha256, the
active ids and the ids active at a snapshot's state.
"""

from __future__ import annotations

import errno
import json
import logging
import operator
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.bundle.records import (
    Item,
    ItemRecord,
    Snapshot,
    StoreError,
    blob_problems,
    check_vectors,
    listed,
    row_problems,
)
from retrieval.infra.checks import positive_int
from retrieval.infra.io import fsync_dir

__all__ = ["BATCH", "SCHEMA_VERSION", "Check", "ItemTable", "connect"]


SCHEMA_VERSION = 1


SQLITE_MAGIC = b"SQLite format 3\x00"


BATCH = 500  # ids per "IN (...)" query, well under SQLite's variable limit


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE removals (seq INTEGER PRIMARY KEY AUTOINCREMENT, removed_at TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    removed_seq INTEGER REFERENCES removals (seq),
    content_sha256 TEXT CHECK (content_sha256 IS NULL OR length(content_sha256) = 64),
    uri TEXT NOT NULL CHECK (length(uri) > 0),
    label TEXT,
    added_at TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{{}}',
    vector BLOB NOT NULL CHECK (length(vector) = {nbytes})
);
CREATE INDEX items_by_removal ON items (removed_seq);
CREATE INDEX items_by_sha256 ON items (content_sha256) WHERE content_sha256 IS NOT NULL;
{label_index};
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    index_sha256 TEXT NOT NULL CHECK (length(index_sha256) = 64),
    ntotal INTEGER NOT NULL,
    max_id INTEGER NOT NULL,
    removal_seq INTEGER NOT NULL,
    factory TEXT NOT NULL,
    search_params TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""  # small columns before the vector, so scans of them never read the vector's pages


# label -> active ids in O(matches). Part of schema version 1 without a version change: an
# index changes no row, older software ignores it (SQLite maintains it), and stores created
# before it get it when opened (see ItemTable.open).
LABEL_INDEX = "CREATE INDEX IF NOT EXISTS items_by_label ON items (label, removed_seq)"


# The vectors searched vectors were derived from (database-side augmentation), when kept.
BASE_TABLE = """CREATE TABLE IF NOT EXISTS base_vectors (
    id INTEGER PRIMARY KEY REFERENCES items (id),
    vector BLOB NOT NULL CHECK (length(vector) = {nbytes})
)"""


def utc_now() -> str:
    """The current UTC time as stored (ISO 8601, milliseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the file at ``path`` (autocommit, usable from any thread); a writer's
    runs in WAL mode with ``synchronous=FULL``, so each commit is on disk when it returns."""
    uri = "file:" + path.absolute().as_posix().replace("?", "%3f").replace("#", "%23")
    conn = sqlite3.connect(
        uri + ("?mode=ro" if read_only else "?mode=rw"),
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        if not read_only:  # a reader leaves the journal mode to the writer
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def insert_snapshot(conn: sqlite3.Connection, snap: Snapshot) -> int:
    """Insert ``snap`` (autocommit, durable); return its row id."""
    cur = conn.execute(
        "INSERT INTO snapshots (index_sha256, ntotal, max_id, removal_seq, factory,"
        " search_params, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            snap.index_sha256.lower(),
            snap.ntotal,
            snap.max_id,
            snap.removal_seq,
            snap.factory,
            snap.search_params,
            snap.created_at,
        ),
    )
    return int(cur.lastrowid or 0)


def create_file(dest: Path, dim: int, first: Snapshot | None) -> None:
    """Write an empty item table of ``dim``-d vectors at ``dest``, with ``first`` recorded:
    built beside it, synced, then linked (or, without hard links, renamed) into place.

    Raises:
        FileExistsError: a file appeared at ``dest`` meanwhile.
    """
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.executescript(
                "BEGIN;"
                + _SCHEMA.format(nbytes=4 * dim, label_index=LABEL_INDEX)
                + "INSERT INTO meta VALUES "
                f"('schema_version', '{SCHEMA_VERSION}'), ('dim', '{dim}'); COMMIT;"
            )
            if first is not None:
                insert_snapshot(conn, replace(first, created_at=utc_now()))
        finally:
            conn.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, dest)  # fails rather than overwrite a store created meanwhile
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if dest.exists():
                raise FileExistsError(f"an item store appeared at {dest} meanwhile") from None
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def read_meta(conn: sqlite3.Connection, src: Path) -> int:
    """The table's dim, after checking the schema version (StoreError otherwise)."""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError as err:
        raise StoreError(f"{src} is an SQLite database but not an item store ({err})") from err
    version = meta.get("schema_version")
    if version is None or not version.isdigit() or "dim" not in meta:
        raise StoreError(f"{src} is not an item store: its meta table lacks a schema version")
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"item store {src} has schema version {version}, newer than this software's "
            f"{SCHEMA_VERSION}: upgrade the retrieval package to read it"
        )
    if int(version) != SCHEMA_VERSION:
        raise StoreError(
            f"item store {src} has schema version {version}, expected {SCHEMA_VERSION}; "
            "no migration exists: re-export the bundle"
        )
    return int(meta["dim"])


Check = Literal["quick", "full", "none"]


log = logging.getLogger(__name__)


class ItemTable:
    """The item table of a bundle: see the module docstring. Build with :meth:`create` or
    :meth:`open`; close with :meth:`close` (or use as a context manager)."""

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
        create_file(dest, dim, first)
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
            if f.read(16) != SQLITE_MAGIC:
                raise StoreError(f"{src} is not an SQLite database (wrong file header)")
        try:
            conn = connect(src, read_only)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open the item store {src}: {err}") from err
        try:
            dim = read_meta(conn, src)
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
                self._conn.execute(LABEL_INDEX)
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
        now, ids = utc_now(), []
        with self._lock, self._transaction():
            if base is not None:
                self._conn.execute(BASE_TABLE.format(nbytes=4 * self._dim))
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
                "INSERT INTO removals (removed_at) VALUES (?)", (utc_now(),)
            ).lastrowid
            for start in range(0, len(wanted), BATCH):
                chunk = wanted[start : start + BATCH]
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
            done = replace(snapshot, created_at=utc_now())
            return replace(done, id=insert_snapshot(self._conn, done))

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

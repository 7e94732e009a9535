"""ItemStore: the bundle's item table in SQLite (``items.sqlite``), durable on every commit.

One row per vector ever added: id (``AUTOINCREMENT``, never reused), image path or URI,
label, extra JSON fields, sha256 of the image bytes, the float32 vector (the one searched) and,
once removed, the sequence number of its removal. Bundles with database-side augmentation also
keep each item's un-augmented vector in a ``base_vectors`` table. A ``snapshots`` table records
each index file written (:mod:`retrieval.bundle.items` replays what happened after the last one).

An index on ``(label, removed_seq)`` finds a label's items in O(matches) (stores created
before it get it when first opened; the schema version did not change, as an added index is
readable by older software). :meth:`ItemStore.check_rows` reads every row to find damage that
SQLite's own checks cannot see (a vector of the right length that is not a unit vector, a
uri with control characters, an ``extra`` that is not a JSON object).

The database runs in WAL mode with ``synchronous=FULL``: a method that writes returns only
after its single transaction is on disk, so a process killed right after it loses nothing.
Thread safety: one connection shared by all threads, every call serialised by a lock.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retrieval.infra.checks import positive_int, unit_rows, vectors
from retrieval.infra.io import fsync_dir

__all__ = [
    "SCHEMA_VERSION",
    "Item",
    "ItemRecord",
    "ItemStore",
    "Snapshot",
    "StoreError",
    "check_vectors",
]
Check = Literal["quick", "full", "none"]
log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_BATCH = 500  # ids per "IN (...)" query, well under SQLite's variable limit
_NORM_TOLERANCE = 1e-3
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
# label -> active ids in O(matches). Added to schema version 1 without a version change: an
# index changes no row, older software ignores it (SQLite maintains it), and stores created
# before it get it when opened (see ItemStore.open).
_LABEL_INDEX = "CREATE INDEX IF NOT EXISTS items_by_label ON items (label, removed_seq)"
_MAX_URI = 4096  # characters; a path or URI longer than PATH_MAX is damage, not data
_MAX_LABEL = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The vectors searched vectors were derived from (database-side augmentation), when kept.
_BASE_TABLE = """CREATE TABLE IF NOT EXISTS base_vectors (
    id INTEGER PRIMARY KEY REFERENCES items (id),
    vector BLOB NOT NULL CHECK (length(vector) = {nbytes})
)"""


class StoreError(ValueError):
    """An item store file is missing pieces, foreign, damaged or from a newer version."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _text_problem(value: Any, limit: int, nullable: bool) -> str | None:
    """Why ``value`` is not a well-formed uri / label (None when it is): text of 1 to
    ``limit`` characters without control characters, or None where ``nullable``."""
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string{' or null' if nullable else ''}, got {value!r:.80}"
    if len(value) > limit:
        return f"is {len(value)} characters long, more than {limit}"
    if _CONTROL.search(value):
        return f"contains control characters: {value!r:.80}"
    return None


@dataclass(frozen=True)
class ItemRecord:
    """What describes one vector to add (validated on construction).

    ``uri``: image path or URI (non-empty). ``extra``: JSON-serialisable fields.
    ``content_sha256``: hex sha256 of the image file bytes (stored lower-case) or None.
    """

    uri: str
    label: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    content_sha256: str | None = None

    def __post_init__(self) -> None:
        for name, limit in (("uri", _MAX_URI), ("label", _MAX_LABEL)):
            problem = _text_problem(getattr(self, name), limit, nullable=name == "label")
            if problem:
                raise ValueError(f"ItemRecord.{name} {problem}")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"ItemRecord.extra must be a mapping, got {type(self.extra)}")
        try:
            json.dumps(dict(self.extra), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ItemRecord.extra of {self.uri!r} is not JSON: {err}") from err
        sha = self.content_sha256
        if sha is not None:
            ok = isinstance(sha, str) and len(sha) == 64
            if not ok or any(c not in "0123456789abcdefABCDEF" for c in sha):
                raise ValueError(f"content_sha256 of {self.uri!r} must be 64 hex digits: {sha!r}")
            object.__setattr__(self, "content_sha256", sha.lower())


@dataclass(frozen=True)
class Item:
    """A stored item; ``removed_seq`` is None while it is active. ``vector``: (dim,) float32."""

    id: int
    uri: str
    label: str | None
    extra: dict[str, Any]
    content_sha256: str | None
    added_at: str
    removed_seq: int | None
    vector: np.ndarray

    @property
    def active(self) -> bool:
        """Whether the item has not been removed."""
        return self.removed_seq is None


@dataclass(frozen=True)
class Snapshot:
    """An index file as written: it holds, in id order, the items with ``id <= max_id`` not
    removed by removal ``removal_seq`` (``ntotal`` of them). ``id`` / ``created_at`` are
    filled in by :meth:`ItemStore.record_snapshot`."""

    index_sha256: str
    ntotal: int
    max_id: int
    removal_seq: int
    factory: str
    search_params: str
    created_at: str = ""
    id: int = 0


def check_vectors(x: Any, dim: int, n: int | None = None, name: str = "vectors") -> np.ndarray:
    """``x`` as C-contiguous float32 when it is (n, dim) finite rows of unit L2 norm (1e-3)."""
    return unit_rows(vectors(x, name, dim=dim, rows=n), name, _NORM_TOLERANCE)


def _row_problems(uri: Any, label: Any, extra: Any, sha: Any) -> list[str]:
    """What is wrong with one item row's text columns (kinds, not values: ids are listed)."""
    kinds = []
    for name, value, limit in (("uri", uri, _MAX_URI), ("label", label, _MAX_LABEL)):
        problem = _text_problem(value, limit, nullable=name == "label")
        if problem:
            kinds.append(
                f"{name} not well-formed (text of 1 to {limit} characters without "
                "control characters" + (", or null)" if name == "label" else ")")
            )
    try:
        fields = json.loads(extra) if isinstance(extra, str) else None
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        kinds.append("extra is not a JSON object")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        kinds.append("content_sha256 is not 64 hex digits")
    return kinds


def _listed(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:20])
    return f"[{shown}{', ...' if len(ids) > 20 else ''}] ({len(ids)} ids)"


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
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


def _insert_snapshot(conn: sqlite3.Connection, snap: Snapshot) -> int:
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


class ItemStore:
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

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], dim: int, initial_snapshot: Snapshot | None = None
    ) -> ItemStore:
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
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.executescript(
                    "BEGIN;"
                    + _SCHEMA.format(nbytes=4 * dim, label_index=_LABEL_INDEX)
                    + "INSERT INTO meta VALUES "
                    f"('schema_version', '{SCHEMA_VERSION}'), ('dim', '{dim}'); COMMIT;"
                )
                if first is not None:
                    _insert_snapshot(conn, replace(first, created_at=_now()))
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
        return cls.open(dest, check="none")

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], check: Check = "quick", read_only: bool = False
    ) -> ItemStore:
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
            if f.read(16) != _SQLITE_MAGIC:
                raise StoreError(f"{src} is not an SQLite database (wrong file header)")
        try:
            conn = _connect(src, read_only)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open the item store {src}: {err}") from err
        try:
            dim = cls._read_meta(conn, src)
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
                self._conn.execute(_LABEL_INDEX)
            except sqlite3.OperationalError as err:  # read-only file or folder
                log.warning(
                    "cannot add the label index to %s (%s): label filters scan it", self._path, err
                )

    @staticmethod
    def _read_meta(conn: sqlite3.Connection, src: Path) -> int:
        """The store's dim, after checking the schema version."""
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
        """
        if any(not isinstance(r, ItemRecord) for r in records):
            raise TypeError("records must be ItemRecord instances")
        x = check_vectors(vectors, self._dim, len(records)).astype("<f4", copy=False)
        base = None
        if base_vectors is not None:
            base = check_vectors(base_vectors, self._dim, len(records)).astype("<f4", copy=False)
        now, ids = _now(), []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if base is not None:
                    self._conn.execute(_BASE_TABLE.format(nbytes=4 * self._dim))
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
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return ids

    def _states(self, ids: Sequence[int]) -> dict[int, int | None]:
        """removed_seq of each known id among ``ids``."""
        found: dict[int, int | None] = {}
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start : start + _BATCH]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT id, removed_seq FROM items WHERE id IN ({marks})", chunk
            ).fetchall()
            found.update(rows)
        return found

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
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                states = self._states(wanted)
                unknown = [i for i in wanted if i not in states]
                if unknown:
                    raise KeyError(f"unknown item ids in {self._path}: {_listed(unknown)}")
                gone = [i for i in wanted if states[i] is not None]
                if gone:
                    raise ValueError(f"items already removed in {self._path}: {_listed(gone)}")
                seq = self._conn.execute(
                    "INSERT INTO removals (removed_at) VALUES (?)", (_now(),)
                ).lastrowid
                for start in range(0, len(wanted), _BATCH):
                    chunk = wanted[start : start + _BATCH]
                    marks = ",".join("?" * len(chunk))
                    self._conn.execute(
                        f"UPDATE items SET removed_seq = ? WHERE id IN ({marks})", [seq, *chunk]
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return wanted

    def get(self, ids: Sequence[int]) -> list[Item]:
        """Items by id, in the order asked (removed ones included, see :attr:`Item.active`).

        Raises:
            KeyError: ids the store never had (listed).
        """
        wanted = [operator.index(i) for i in ids]
        rows: dict[int, Item] = {}
        with self._lock:
            for start in range(0, len(wanted), _BATCH):
                chunk = wanted[start : start + _BATCH]
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
            raise KeyError(f"unknown item ids in {self._path}: {_listed(unknown)}")
        return [rows[i] for i in wanted]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), dim) float32 vectors of ``ids`` in the order asked. Raises KeyError."""
        items = self.get(ids)
        out = np.empty((len(items), self._dim), dtype=np.float32)
        for row, item in enumerate(items):
            out[row] = item.vector
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

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _ids(self, sql: str, params: Sequence[Any] = ()) -> np.ndarray:
        return np.array([r[0] for r in self._fetch(sql, params)], dtype=np.int64)

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
            self._check_blobs("items", rows, bad)
            if bad:
                raise StoreError(
                    f"{self._path} holds damaged vectors: "
                    + "; ".join(f"{what}: {_listed(ids)}" for what, ids in bad.items())
                )
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            buf = b"".join(r[1] for r in rows)
            yield ids, np.frombuffer(buf, dtype="<f4").astype(np.float32).reshape(-1, self._dim)
            last = int(ids[-1])

    def record_snapshot(self, snapshot: Snapshot) -> Snapshot:
        """Record an index file written for the store's state (durable); return it with its
        ``id`` and ``created_at``. Raises ValueError for a state the store never reached."""
        with self._lock:
            if snapshot.max_id > self.max_id or snapshot.removal_seq > self.removal_seq:
                raise ValueError(f"snapshot {snapshot} is ahead of the store {self._path}")
            done = replace(snapshot, created_at=_now())
            return replace(done, id=_insert_snapshot(self._conn, done))

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
                for kind in _row_problems(uri, label, extra, sha):
                    bad.setdefault(f"items: {kind}", []).append(item_id)
            self._check_blobs("items", rows, bad)
        if self._has_base_vectors():
            sql = (
                "SELECT b.id, b.vector FROM base_vectors b JOIN items i ON i.id = b.id"
                f" WHERE b.id > ?{active} ORDER BY b.id LIMIT ?"
            )
            for rows in self._chunks(sql, chunk_size):
                self._check_blobs("base_vectors", rows, bad)
        return [f"{self._path} {what}: {_listed(ids)}" for what, ids in bad.items()]

    def _chunks(self, sql: str, size: int) -> Iterator[list[Any]]:
        """The rows of ``sql`` (``id > ? ... ORDER BY id LIMIT ?``, id first), chunk by chunk."""
        last = 0
        while True:
            rows = self._fetch(sql, (last, size))
            if not rows:
                return
            yield rows
            last = int(rows[-1][0])

    def _check_blobs(self, table: str, rows: list[Any], bad: dict[str, list[int]]) -> None:
        """Add the ids of ``(id, ..., vector)`` rows whose vector is not a finite unit one."""
        nbytes = 4 * self._dim
        good = []
        for row in rows:
            blob = row[-1]
            if not isinstance(blob, bytes) or len(blob) != nbytes:
                bad.setdefault(f"{table}: vector is not {nbytes} bytes", []).append(row[0])
            else:
                good.append(row)
        if not good:
            return
        x = np.frombuffer(b"".join(r[-1] for r in good), dtype="<f4").reshape(-1, self._dim)
        with np.errstate(all="ignore"):
            finite = np.isfinite(x).all(axis=1)
            norms = np.linalg.norm(x.astype(np.float64), axis=1)
        off = finite & (np.abs(norms - 1.0) > _NORM_TOLERANCE)
        for mask, what in ((~finite, "NaN or infinite"), (off, "norm not 1")):
            for row in np.flatnonzero(mask):
                bad.setdefault(f"{table}: vector {what}", []).append(int(good[row][0]))

    def _has_base_vectors(self) -> bool:
        return bool(
            self._fetch(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'base_vectors'"
            )
        )

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
            for start in range(0, len(wanted), _BATCH):
                chunk = wanted[start : start + _BATCH]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(  # by rowid, not through the label index
                    f"SELECT id, label, removed_seq FROM items WHERE id IN ({marks})", chunk
                ).fetchall()
                found += [r[0] for r in rows if r[1] == label and r[2] is None]
        return np.array(sorted(found), dtype=np.int64)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) float32 vectors of ``ids`` (increasing, known) in that order: only
        the vector column is read. Raises KeyError for ids the store never had."""
        wanted = np.asarray(ids, dtype=np.int64)
        out = np.empty((wanted.size, self._dim), dtype=np.float32)
        with self._lock:
            for start in range(0, wanted.size, _BATCH):
                chunk = wanted[start : start + _BATCH].tolist()
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT id, vector FROM items WHERE id IN ({marks}) ORDER BY id", chunk
                ).fetchall()
                if [r[0] for r in rows] != chunk:
                    missing = sorted(set(chunk) - {r[0] for r in rows})
                    raise KeyError(f"unknown item ids in {self._path}: {_listed(missing)}")
                buf = b"".join(r[1] for r in rows)
                out[start : start + len(chunk)] = np.frombuffer(buf, "<f4").reshape(-1, self._dim)
        return out

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ItemStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ItemStore({str(self._path)!r}, dim={self._dim})"

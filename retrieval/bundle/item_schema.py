"""The SQLite file of the item table (``items.sqlite``): its schema, how it is created
(all-or-nothing) and connected to, and its ``meta`` table (schema version, dim).

Tables: ``meta``; ``removals`` (one sequence number per removal); ``items`` (one row per
vector ever added: id, ``AUTOINCREMENT`` so never reused, uri, label, extra JSON fields,
sha256 of the image bytes, the float32 vector searched and, once removed, the sequence number
of its removal); ``snapshots`` (each index file written, see :mod:`retrieval.bundle.snapshot`);
with database-side augmentation, ``base_vectors`` (each item's un-augmented vector).

An index on ``(label, removed_seq)`` finds a label's items in O(matches) (stores created
before it get it when first opened; the schema version did not change, as an added index is
readable by older software).
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from retrieval.bundle.records import StoreError
from retrieval.bundle.snapshot import Snapshot
from retrieval.infra.io import fsync_dir

__all__ = [
    "BASE_TABLE",
    "BATCH",
    "LABEL_INDEX",
    "SCHEMA_VERSION",
    "SQLITE_MAGIC",
    "connect",
    "create_file",
    "insert_snapshot",
    "now",
    "read_meta",
]

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


def now() -> str:
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
                insert_snapshot(conn, replace(first, created_at=now()))
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

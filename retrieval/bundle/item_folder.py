"""A folder of items on disk: ``items.sqlite`` (the :class:`ItemTable`), ``index.faiss`` (the
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
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrieval.bundle import item_schema
from retrieval.bundle.format import BundleBusyError, BundleError
from retrieval.bundle.item_checks import check_vectors, listed
from retrieval.bundle.item_table import Check, ItemTable
from retrieval.bundle.snapshot import (
    INDEX_FILE,
    IndexStateError,
    Snapshot,
    load_index,
    load_index_read_only,
)
from retrieval.index import EmbeddingIndex
from retrieval.infra.locks import LockHeldError, hold_exclusive

__all__ = [
    "LOCK_FILE",
    "STORE_FILE",
    "check_item_uris",
    "create_folder",
    "item_path",
    "lock_folder",
    "open_folder",
    "open_folder_read_only",
]

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
    with contextlib.closing(item_schema.connect(store, read_only=True)) as conn:
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

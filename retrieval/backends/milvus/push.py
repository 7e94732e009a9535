"""``retrieval push``: a bundle's active items uploaded to a Milvus collection, resumably."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.backends.base import BackendError, BackendSpec
from retrieval.backends.milvus.backend import MilvusBackend
from retrieval.backends.milvus.collection import BATCH, choose_index, chunks
from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.records import ItemRecord
from retrieval.infra.checks import positive_int

__all__ = ["PushReport", "push_bundle", "push_store"]


@dataclass
class PushReport:
    """What :func:`push_bundle` did: items written now, found already there, deleted
    (removed from the bundle since an earlier push), left out (removed through the engine,
    see :mod:`~retrieval.backends.milvus.collection`), the collection's count after, its index,
    and what was repaired before (one line each)."""

    pushed: int
    present: int
    deleted: int
    total: int
    index: dict[str, Any]
    left_out: int = 0
    repaired: list[str] = field(default_factory=list)


def push_bundle(
    bundle: str | Path,
    spec: BackendSpec,
    batch_size: int = BATCH,
    progress: Callable[[int], None] | None = None,
    repair: bool = False,
) -> PushReport:
    """Upload a bundle's active items (ids, labels, uris, extra fields, sha256, vectors) to
    the collection of ``spec``, created with :func:`choose_index` for their count if missing.

    Resumable: a batch is written only for the ids the collection does not hold yet, each
    row written by id (an upsert), so a push killed midway and run again completes the
    collection with each item once. Items removed from the bundle are deleted from the
    collection; items added through the engine (ids above the bundle's) are left alone, and
    bundle items removed through the engine are not brought back. A collection whose index
    cannot be loaded (Milvus Lite writes index files in place, so a process killed while
    writing one leaves it torn) is a BackendError; with ``repair`` the index is rebuilt
    from the stored vectors first (``PushReport.repaired`` says so); the rows, those added
    through the engine included, are kept.
    """
    from retrieval.bundle.format import read_manifest
    from retrieval.bundle.items import STORE_FILE

    positive_int(batch_size, "batch_size")
    folder = Path(bundle)
    dim = int(read_manifest(folder)["embedding_dim"])
    store = ItemTable.open(folder / STORE_FILE)
    try:
        if store.dim != dim:
            raise BackendError(
                f"{folder}: its item store holds {store.dim}-d vectors, its manifest says {dim}"
            )
        return push_store(store, spec, batch_size, progress, repair)
    finally:
        store.close()


def push_store(
    store: ItemTable,
    spec: BackendSpec,
    batch_size: int = BATCH,
    progress: Callable[[int], None] | None = None,
    repair: bool = False,
) -> PushReport:
    """:func:`push_bundle` from an open item store."""
    positive_int(batch_size, "batch_size")
    index = choose_index(store.active_count)
    with MilvusBackend.connect(spec, store.dim, create=index, repair=repair) as backend:
        removed = store.removed_since(0, store.max_id).tolist()
        gone = sorted(backend.present(removed))
        for chunk in chunks(gone):
            backend._client.delete(spec.collection, ids=list(chunk))
        pushed = present = left_out = 0
        for ids, _ in store.iter_active(chunk_size=batch_size):
            wanted = [int(i) for i in ids]
            there = backend.present(wanted)
            dropped = backend.removed_through_engine(wanted) - there
            missing = [i for i in wanted if i not in there and i not in dropped]
            present, left_out = present + len(there), left_out + len(dropped)
            if missing:
                backend.write_rows(
                    [
                        backend.row(
                            it.id,
                            ItemRecord(it.uri, it.label, it.extra, it.content_sha256),
                            it.vector,
                            it.added_at,
                        )
                        for it in store.get(missing)
                    ]
                )
                pushed += len(missing)
            if progress is not None:
                progress(len(ids))
        if pushed or gone:
            backend.seal()
        total, described = backend.ntotal, backend.describe()
        return PushReport(pushed, present, len(gone), total, described, left_out, backend.repaired)

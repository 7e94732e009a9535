"""``retrieval push``: a bundle's active items uploaded to a Milvus collection, resumably."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.backends.base import BackendError
from retrieval.backends.milvus.backend import MilvusBackend
from retrieval.backends.milvus.collection import BATCH, choose_index, chunks, row_of
from retrieval.backends.spec import BackendSpec
from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.records import ItemRecord

__all__ = ["PushReport", "push_bundle", "push_store"]


@dataclass
class PushReport:
    """What :func:`push_bundle` did: items written now, found already there, deleted
    (removed from the bundle since an earlier push), and the collection's count after."""

    pushed: int
    present: int
    deleted: int
    total: int
    index: dict[str, Any]


def push_bundle(
    bundle: str | Path,
    spec: BackendSpec,
    batch_size: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> PushReport:
    """Upload a bundle's active items (ids, labels, uris, extra fields, sha256, vectors) to
    the collection of ``spec``, created with :func:`choose_index` for their count if missing.

    Resumable: a batch is written only for the ids the collection does not hold yet, so a
    push killed midway and run again completes the collection with each item once. Items
    removed from the bundle are deleted from the collection; items added through the engine
    (ids above the bundle's) are left alone.
    """
    from retrieval.bundle.format import read_manifest
    from retrieval.bundle.item_folder import STORE_FILE

    folder = Path(bundle)
    dim = int(read_manifest(folder)["embedding_dim"])
    store = ItemTable.open(folder / STORE_FILE)
    try:
        if store.dim != dim:
            raise BackendError(
                f"{folder}: its item store holds {store.dim}-d vectors, its manifest says {dim}"
            )
        return push_store(store, spec, batch_size, progress)
    finally:
        store.close()


def push_store(
    store: ItemTable,
    spec: BackendSpec,
    batch_size: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> PushReport:
    """:func:`push_bundle` from an open item store."""
    index = choose_index(store.active_count)
    with MilvusBackend.connect(spec, store.dim, create=index) as backend:
        removed = store.removed_since(0, store.max_id).tolist()
        gone = sorted(backend.present(removed))
        for chunk in chunks(gone):
            backend._client.delete(spec.collection, ids=list(chunk))
        pushed = present = 0
        for ids, _ in store.iter_active(chunk_size=batch_size):
            there = backend.present(ids.tolist())
            missing = [int(i) for i in ids if int(i) not in there]
            present += len(there)
            if missing:
                rows = [
                    row_of(
                        it.id,
                        ItemRecord(it.uri, it.label, it.extra, it.content_sha256),
                        it.vector,
                        it.added_at,
                    )
                    for it in store.get(missing)
                ]
                backend._client.insert(spec.collection, rows)
                pushed += len(rows)
            if progress is not None:
                progress(len(ids))
        return PushReport(pushed, present, len(gone), backend.ntotal, backend.describe())

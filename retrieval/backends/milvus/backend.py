"""The Milvus backend class: one collection of items, searched, read and written through a
``pymilvus`` client (see :mod:`retrieval.backends.milvus` for the collection's layout, the
ids of added items and the record of removed ones).

Searching the collection under the house rule: inner products of unit vectors, equal
scores by ascending id. Milvus orders ties arbitrarily, so a search asks for more than ``k``
and searches deeper while a group of equal scores straddles the ``k``-th place.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from retrieval.backends.base import BackendError, BackendSpec
from retrieval.backends.milvus.collection import (
    FIELDS,
    IndexChoice,
    check_collection,
    chunks,
    drop_removals,
    item_of,
    label_filter,
    nullable_text,
    open_collection,
    open_removals,
    quote,
    record_removals,
    recorded_removals,
    row_of,
)
from retrieval.backends.milvus.engine import (
    ServerVersion,
    engine_logs_held,
    open_client,
    release,
    server_version,
)
from retrieval.bundle.records import AddResult, Item, ItemRecord, check_vectors, plan_add
from retrieval.index.faiss_runtime import keep_numpy_search_params

__all__ = ["MAX_TOPK", "MilvusBackend", "ranked_search", "search_params"]


_EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()


_LOW_BITS = 21  # clock ids stay below _HASHED until 2088


_HASHED = 1 << 52  # ids of images: _HASHED + 52 bits of their sha256, below 2**53


#: how long the rows a search returned answer :meth:`MilvusBackend.hit_records` (seconds)
_SEARCHED_S = 2.0


_HIT_FIELDS = tuple(name for name in FIELDS if name != "vector")


class MilvusBackend:
    """A Milvus collection as a :class:`~retrieval.backends.SearchBackend`. Build with
    :meth:`connect`. Thread-safe (pymilvus clients are); writes are serialised per process."""

    def __init__(
        self,
        spec: BackendSpec,
        client: Any,
        dim: int,
        index: dict[str, Any],
        read_only: bool,
        version: ServerVersion,
        nullable: bool,
    ) -> None:
        self.spec, self._client, self._dim = spec, client, dim
        self._index, self._read_only = index, read_only
        self.version, self._nullable = version, nullable
        self._write = threading.Lock()
        self._searched = threading.local()  # the rows this thread's last search returned
        self._last_id = 0
        self._closed = False
        self.repaired: list[str] = []  # what opening it repaired, one line each

    # opening -------------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        spec: BackendSpec,
        dim: int,
        read_only: bool = False,
        create: IndexChoice | None = None,
        timeout_s: float = 10.0,
        repair: bool = False,
    ) -> MilvusBackend:
        """Open the collection of ``spec`` (and, unless ``read_only``, its removal record);
        with ``create``, make it (with that index) if it does not exist; with ``repair`` (and
        ``create``), rebuild an index that cannot be loaded from the stored vectors (see
        :func:`~retrieval.backends.milvus.collection.open_collection`), each repair a line
        of :attr:`repaired`. Raises BackendError: pymilvus missing, engine unreachable, no
        such collection, one that is not an item collection of ``dim``-d vectors, or one
        that cannot be loaded (without ``repair``)."""
        with engine_logs_held():
            client = open_client(spec, timeout_s)
            try:
                version = server_version(client)
                if create is not None and not client.has_collection(spec.collection):
                    drop_removals(client, spec.collection)  # of a former collection
                index, note = open_collection(
                    client, spec, dim, create, repair, nullable=version.nullable
                )
                nullable = nullable_text(client, spec.collection)
                notes = [note, "" if read_only else open_removals(client, spec, repair)]
            except BaseException:
                client.close()
                release(spec)
                raise
        backend = cls(spec, client, dim, index, read_only, version, nullable)
        backend.repaired = [line for line in notes if line]
        return backend

    # the interface -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        rows = self._client.query(
            self.spec.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(rows[0]["count(*)"])

    def search(
        self, vectors: np.ndarray, k: int, label: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`SearchBackend.search`; ``k`` is capped at 16,384 (Milvus's limit). The
        rows found (but their vectors, which a server reads in a second pass) come with the
        results, for :meth:`hit_records`: a search and its hits' records cost one round trip
        (a Strong one waits for the server's next time tick, 200 ms by default)."""
        xq = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.spec.kind == "milvus-lite":  # its FAISS indexes run in this process
            keep_numpy_search_params()
        where = "" if label is None else label_filter(label)
        if where is None:  # a label no item can have
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        scores, ids, rows = ranked_search(
            self._client, self.spec.collection, self._index, xq, k, where, _HIT_FIELDS
        )
        self._searched.rows, self._searched.at = rows, time.monotonic()
        return scores, ids

    def add(
        self,
        records: Sequence[ItemRecord],
        vectors: np.ndarray,
        base_vectors: np.ndarray | None = None,
        dba: tuple[int, float] | None = None,
    ) -> AddResult:
        """See :meth:`SearchBackend.add`. ``base_vectors`` are not kept, and ``dba`` is
        refused: augmenting new items needs every item's base vector, which only the bundle
        keeps (add to the bundle, then push it again)."""
        self.check_writable()
        if dba is not None:
            raise BackendError(
                f"{self.spec.where}: the bundle augments added items (DBA), which needs the "
                "base vectors only the bundle keeps: add with 'retrieval index BUNDLE DIR' "
                "and push the bundle again"
            )
        if any(not isinstance(r, ItemRecord) for r in records):
            raise TypeError("records must be ItemRecord instances")
        x = check_vectors(vectors, self._dim, len(records))
        with self._write:
            plan = plan_add(records, self._ids_by_sha256)
            new_ids = self._new_ids([records[i].content_sha256 for i in plan.fresh])
            now = _now()
            rows = [
                self.row(new_id, records[i], x[i], now)
                for i, new_id in zip(plan.fresh, new_ids, strict=True)
            ]
            self.write_rows(rows)
        return plan.result(new_ids)

    def row(
        self, item_id: int, record: ItemRecord, vector: np.ndarray, added_at: str
    ) -> dict[str, Any]:
        """The row of an item in this collection's layout
        (:func:`~retrieval.backends.milvus.collection.row_of`)."""
        return row_of(item_id, record, vector, added_at, self._nullable)

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write collection rows (see :meth:`row`), each replacing any row of its id: writing
        a row twice, from one process or from two at once, leaves it once."""
        for chunk in chunks(list(rows)):
            self._client.upsert(self.spec.collection, list(chunk))

    def seal(self) -> None:
        """Flush the collection's rows into sealed segments, which the server then indexes:
        after a push, so that searches use the collection's index (a server searches
        unsealed rows through a coarse interim index of its own, Milvus 2.3's IVF, whose
        results differ from the index's)."""
        self._client.flush(self.spec.collection)

    def _new_ids(self, shas: Sequence[str | None]) -> list[int]:
        """An id for each new item of these distinct sha256s (None: an item without one)
        (see :mod:`retrieval.backends.milvus`)."""
        hashed = self._hashed_ids([s for s in shas if s is not None])
        clock = iter(self._clock_ids(sum(s is None for s in shas)))
        return [next(clock) if s is None else hashed[s] for s in shas]

    def _hashed_ids(self, shas: Sequence[str]) -> dict[str, int]:
        """The id of each image: ``_HASHED`` + its sha256's first 52 bits, or the next one up
        (wrapping below 2**53) that no other image of the collection or of ``shas`` holds."""
        ids = {s: _HASHED + int(s[:13], 16) for s in sorted(shas)}  # one order everywhere
        while True:
            held: dict[int, str | None] = {}
            for chunk in chunks(list(ids.values())):
                rows = self._client.query(
                    self.spec.collection,
                    filter=f"id in [{', '.join(str(i) for i in chunk)}]",
                    output_fields=["id", "content_sha256"],
                    consistency_level="Strong",
                )
                held.update((int(r["id"]), r.get("content_sha256") or None) for r in rows)
            moved = False
            for sha, item_id in ids.items():
                if held.setdefault(item_id, sha) != sha:
                    ids[sha] = _HASHED + (item_id + 1 - _HASHED) % _HASHED
                    moved = True
            if not moved:
                return ids

    def _clock_ids(self, count: int) -> list[int]:
        """``count`` consecutive clock ids no item has."""
        while True:
            clock = int(time.time() - _EPOCH) << _LOW_BITS
            start = max(clock + secrets.randbelow(1 << (_LOW_BITS - 1)), self._last_id + 1)
            ids = list(range(start, start + count))
            if not count or not self.present(ids):
                self._last_id = max(self._last_id, ids[-1] if ids else 0)
                return ids

    def _ids_by_sha256(self, shas: Sequence[str]) -> dict[str, int]:
        """The lowest id of an item with each of ``shas``."""
        out: dict[str, int] = {}
        for chunk in chunks(list(shas)):
            rows = self._client.query(
                self.spec.collection,
                filter=f"content_sha256 in [{', '.join(quote(s) for s in chunk)}]",
                output_fields=["id", "content_sha256"],
                consistency_level="Strong",
            )
            for row in rows:
                sha, item_id = row["content_sha256"], int(row["id"])
                out[sha] = min(item_id, out.get(sha, item_id))
        return out

    def present(self, ids: Sequence[int]) -> set[int]:
        """The ids among ``ids`` that the collection holds."""
        out: set[int] = set()
        for chunk in chunks([int(i) for i in ids]):
            rows = self._client.query(
                self.spec.collection,
                filter=f"id in [{', '.join(str(i) for i in chunk)}]",
                output_fields=["id"],
                consistency_level="Strong",
            )
            out.update(int(r["id"]) for r in rows)
        return out

    def remove(self, ids: Sequence[int]) -> list[int]:
        self.check_writable()
        wanted = sorted({int(i) for i in ids})
        with self._write:
            unknown = sorted(set(wanted) - self.present(wanted))
            if unknown:
                shown = ", ".join(str(i) for i in unknown[:20])
                raise KeyError(f"unknown item ids in {self.spec.where}: [{shown}]")
            record_removals(self._client, self.spec.collection, wanted, _now())
            for chunk in chunks(wanted):
                self._client.delete(self.spec.collection, ids=list(chunk))
        return wanted

    def removed_through_engine(self, ids: Sequence[int]) -> set[int]:
        """The ids among ``ids`` whose removal through a backend is recorded (see
        :mod:`~retrieval.backends.milvus.collection`): push does not bring them back."""
        return recorded_removals(self._client, self.spec.collection, ids)

    def get(self, ids: Sequence[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        for chunk in chunks([int(i) for i in ids]):
            rows = self._client.get(
                self.spec.collection, ids=list(chunk), output_fields=list(FIELDS)
            )
            out.update((int(r["id"]), item_of(r)) for r in rows)
        return out

    def hit_records(self, ids: Sequence[int]) -> dict[int, Item]:
        """See :meth:`SearchBackend.hit_records`: read from the rows this thread's last search
        returned (within :data:`_SEARCHED_S` of it, each once), without their vectors; any
        other is read from the engine by :meth:`get`."""
        wanted = [int(i) for i in ids]
        searched = getattr(self._searched, "rows", {})
        fresh = time.monotonic() - getattr(self._searched, "at", 0.0) < _SEARCHED_S
        if not (wanted and fresh and all(i in searched for i in wanted)):
            return self.get(wanted)
        return {i: item_of({**searched.pop(i), "vector": ()}) for i in wanted}

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        items = self.get(ids)
        missing = [int(i) for i in ids if int(i) not in items]
        if missing:
            raise KeyError(f"unknown item ids in {self.spec.where}: {missing[:20]}")
        out = np.empty((len(ids), self._dim), np.float32)
        for row, item_id in enumerate(ids):
            out[row] = items[int(item_id)].vector
        return out

    def find_by_sha256(self, sha256: str) -> list[int]:
        rows = self._client.query(
            self.spec.collection,
            filter=f"content_sha256 == {quote(sha256.lower())}",
            output_fields=["id"],
            consistency_level="Strong",
        )
        return sorted(int(r["id"]) for r in rows)

    def removed_uris(self) -> set[str]:
        return set()  # removed items are deleted from the collection

    def check_writable(self) -> None:
        if self._read_only:
            raise BackendError(f"{self.spec.where} was opened read-only")

    def describe(self) -> dict[str, Any]:
        place = (
            {"uri": self.spec.uri} if self.spec.kind == "milvus" else {"path": str(self.spec.path)}
        )
        return {
            "kind": self.spec.kind,
            **place,
            "server": self.version.text,
            "collection": self.spec.collection,
            "index_type": self._index["index_type"],
            "params": dict(self._index.get("params", {})),
            "metric": "IP",
        }

    def verify(self, sample: int = 100) -> list[str]:
        """Problems found: the collection's schema and dimension, and a sample of its items
        each found first (score ~1) with its own vector."""
        try:
            check_collection(self._client, self.spec, self._dim)
        except BackendError as err:
            return [str(err)]
        rows = self._client.query(
            self.spec.collection, filter="", output_fields=["id", "vector"], limit=sample
        )
        problems = []
        if rows:
            x = np.asarray([r["vector"] for r in rows], np.float32)
            scores, ids = self.search(x, 10)
            for row, r in enumerate(rows):
                hit = np.flatnonzero(ids[row] == int(r["id"]))
                if hit.size == 0 or scores[row, hit[0]] < 1 - 1e-3:
                    problems.append(f"item {r['id']} is not found with its own vector")
        return problems

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
        release(self.spec)

    def __enter__(self) -> MilvusBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusBackend({self.spec.where})"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


MAX_TOPK = 16_384  # Milvus's largest search limit


def search_params(index_type: str, params: dict[str, Any], limit: int) -> dict[str, Any]:
    """Search parameters for an index as ``describe_index`` reports it."""
    kind = index_type.upper()
    if kind.startswith("HNSW"):
        return {"ef": max(limit, 128)}
    if kind.startswith("IVF"):
        nlist = int(params.get("nlist", 1024))
        return {"nprobe": min(nlist, max(16, nlist // 64))}
    return {}


def ranked_search(
    client: Any,
    collection: str,
    index: dict[str, Any],
    xq: np.ndarray,
    k: int,
    where: str,
    fields: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """``(scores, ids, rows)`` of the ``k`` (at most :data:`MAX_TOPK`) best rows of
    ``collection`` that pass the filter ``where`` for each row of ``xq``, best first, equal
    scores by ascending id, and the ``fields`` of every row found (by id; the same request,
    so no second round trip reads them); ``index`` is the collection's vector index
    description."""
    k = min(int(k), MAX_TOPK)
    rows: dict[int, dict[str, Any]] = {}
    found: list[list[tuple[float, int]]] = [[] for _ in range(len(xq))]
    todo = list(range(len(xq)))
    want = min(MAX_TOPK, k + max(8, k // 4))
    while todo:
        answer = client.search(
            collection,
            data=[xq[row] for row in todo],
            limit=want,
            filter=where,
            output_fields=list(fields),
            search_params={
                "metric_type": "IP",
                "params": search_params(index["index_type"], index.get("params", {}), want),
            },
            consistency_level="Strong",
        )
        left = []
        for row, hits in zip(todo, answer, strict=True):
            pairs = sorted((-float(h["distance"]), int(h["id"])) for h in hits)
            if fields:
                rows.update((int(h["id"]), {**h["entity"], "id": int(h["id"])}) for h in hits)
            found[row] = pairs
            straddles = len(pairs) > k and pairs[k - 1][0] == pairs[-1][0]
            if straddles and len(pairs) == want and want < MAX_TOPK:
                left.append(row)  # equal scores may go on past what was returned
        todo, want = left, min(MAX_TOPK, want * 4)
    width = max((min(k, len(p)) for p in found), default=0)
    scores = np.full((len(xq), width), -np.inf, np.float32)
    ids = np.full((len(xq), width), -1, np.int64)
    for row, pairs in enumerate(found):
        best = pairs[:width]
        scores[row, : len(best)] = [-s for s, _ in best]
        ids[row, : len(best)] = [i for _, i in best]
    return scores, ids, rows

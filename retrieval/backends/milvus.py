"""The Milvus backend: a bundle's items searched in a Milvus collection through ``pymilvus``.

One collection per bundle, one row per active item: ``id`` (INT64 primary key, the bundle's
ids), ``vector`` (FLOAT_VECTOR, metric IP), ``label`` and ``content_sha256`` (VARCHAR, may be
null), ``uri``, ``added_at`` (VARCHAR) and ``extra`` (JSON). Collections are created with
``Strong`` consistency and searched and queried with it, so every process that points at the
engine sees a write once it has returned: replicas of ``retrieval serve`` share adds and
removals. Removed items are deleted from the collection.

Results follow the house rule: inner products of unit vectors, equal scores by ascending id
(Milvus orders ties arbitrarily, so a search asks for more than ``k`` and searches deeper while
a group of equal scores straddles the ``k``-th place).

Items added through this backend get ids from the clock (seconds since 2020 in the high bits,
a random start in the low 22): above every bundle id, increasing within a process, below
2**53 (exact in JavaScript) until 2088, and checked unused before they are written.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.backends.base import BackendError
from retrieval.backends.spec import BackendSpec
from retrieval.bundle.items import AddResult
from retrieval.bundle.store import Item, ItemRecord, ItemStore, check_vectors

__all__ = [
    "IndexChoice",
    "MilvusBackend",
    "PushReport",
    "choose_index",
    "push_bundle",
    "push_store",
]

FIELDS = ("id", "vector", "label", "uri", "extra", "content_sha256", "added_at")
MAX_TOPK = 16_384  # Milvus's largest search limit
_BATCH = 1000  # ids per get / query / insert request
_EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()
_LOW_BITS = 22
_lite_users: dict[Path, int] = {}  # Milvus Lite folders opened in this process -> backends
_lite_lock = threading.Lock()


@dataclass(frozen=True)
class IndexChoice:
    """A Milvus vector index: type, build parameters and the search parameters used with it."""

    index_type: str
    params: dict[str, int]
    search: dict[str, int]


def choose_index(n: int) -> IndexChoice:
    """The index for ``n`` vectors: HNSW up to 2 million (M 16 up to 200,000, else 32;
    efConstruction 200; ef 128 or k if more), IVF_FLAT above (nlist the power of two nearest
    4 sqrt(n), 1024 to 65536; nprobe nlist / 64, at least 16)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= 2_000_000:
        m = 16 if n <= 200_000 else 32
        return IndexChoice("HNSW", {"M": m, "efConstruction": 200}, {"ef": 128})
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    nlist = min(65_536, max(1024, nlist))
    return IndexChoice("IVF_FLAT", {"nlist": nlist}, {"nprobe": max(16, nlist // 64)})


def _search_params(index_type: str, params: dict[str, Any], limit: int) -> dict[str, Any]:
    """Search parameters for an index as ``describe_index`` reports it."""
    kind = index_type.upper()
    if kind.startswith("HNSW"):
        return {"ef": max(limit, 128)}
    if kind.startswith("IVF"):
        nlist = int(params.get("nlist", 1024))
        return {"nprobe": min(nlist, max(16, nlist // 64))}
    return {}


def _quote(text: str) -> str:
    """A Milvus filter string literal (labels and hashes hold no control characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _import_pymilvus(spec: BackendSpec) -> Any:
    try:
        import pymilvus
    except ImportError:
        raise BackendError(
            f"backend {spec.text!r} needs pymilvus (and milvus-lite for milvus-lite:): "
            "pip install -e '.[milvus]'"
        ) from None
    return pymilvus


def _lite_uri(spec: BackendSpec) -> str:
    """Start (or reuse) this process's Milvus Lite server for ``spec.path``; its address."""
    assert spec.path is not None
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        raise BackendError(
            f"backend {spec.text!r} needs milvus-lite: pip install -e '.[milvus]'"
        ) from None
    if spec.path.exists() and not spec.path.is_dir():
        raise BackendError(f"backend {spec.text!r}: {spec.path} is a file, not a folder")
    try:
        spec.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BackendError(f"backend {spec.text!r}: cannot create {spec.path}: {err}") from None
    with _lite_lock:
        uri = server_manager_instance.start_and_get_uri(str(spec.path))
        if uri is None:
            raise BackendError(
                f"backend {spec.text!r}: Milvus Lite cannot open {spec.path} (is another "
                "process using it? Milvus Lite serves one process; for several, run "
                f"'python -m milvus_lite server --data-dir {spec.path} --port PORT' and use "
                "--backend milvus://127.0.0.1:PORT/COLLECTION)"
            )
        _lite_users[spec.path] = _lite_users.get(spec.path, 0) + 1
    return str(uri)


def _release_lite(path: Path) -> None:
    from milvus_lite.server_manager import server_manager_instance

    with _lite_lock:
        left = _lite_users.get(path, 0) - 1
        if left > 0:
            _lite_users[path] = left
            return
        _lite_users.pop(path, None)
        server_manager_instance.release_server(str(path))


def _item(row: dict[str, Any]) -> Item:
    vector = np.asarray(row["vector"], dtype=np.float32)
    extra = row.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    return Item(
        int(row["id"]),
        str(row["uri"]),
        row.get("label"),
        dict(extra),
        row.get("content_sha256"),
        str(row.get("added_at") or ""),
        None,
        vector,
    )


def _chunks(values: Sequence[Any], size: int = _BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class MilvusBackend:
    """A Milvus collection as a :class:`~retrieval.backends.SearchBackend`. Build with
    :meth:`connect`. Thread-safe (pymilvus clients are); writes are serialised per process."""

    def __init__(
        self, spec: BackendSpec, client: Any, dim: int, index: dict[str, Any], read_only: bool
    ) -> None:
        self.spec, self._client, self._dim = spec, client, dim
        self._index, self._read_only = index, read_only
        self._write = threading.Lock()
        self._last_id = 0
        self._closed = False

    # opening -------------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        spec: BackendSpec,
        dim: int,
        read_only: bool = False,
        create: IndexChoice | None = None,
        timeout_s: float = 10.0,
    ) -> MilvusBackend:
        """Open the collection of ``spec``; with ``create``, make it (with that index) if it
        does not exist. Raises BackendError: pymilvus missing, engine unreachable, no such
        collection, or one that is not an item collection of ``dim``-d vectors."""
        pymilvus = _import_pymilvus(spec)
        uri = _lite_uri(spec) if spec.kind == "milvus-lite" else spec.uri
        try:
            client = pymilvus.MilvusClient(uri=uri, timeout=timeout_s)
            client.list_collections()
        except Exception as err:  # grpc / pymilvus errors of every kind
            if spec.kind == "milvus-lite" and spec.path is not None:
                _release_lite(spec.path)
            reason = getattr(err, "message", None) or str(err) or type(err).__name__
            reason = str(reason).splitlines()[0]
            raise BackendError(f"cannot reach Milvus for {spec.where}: {reason}") from None
        try:
            if not client.has_collection(spec.collection):
                if create is None:
                    raise BackendError(
                        f"no {spec.where}: fill it first with 'retrieval push BUNDLE {spec.text}'"
                    )
                _create_collection(client, spec.collection, dim, create)
            index = _check_collection(client, spec, dim)
            client.load_collection(spec.collection)
        except BaseException:
            client.close()
            if spec.kind == "milvus-lite" and spec.path is not None:
                _release_lite(spec.path)
            raise
        return cls(spec, client, dim, index, read_only)

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
        """See :meth:`SearchBackend.search`; ``k`` is capped at 16,384 (Milvus's limit)."""
        xq = np.ascontiguousarray(vectors, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self._dim:
            raise ValueError(f"vectors must have shape (n, {self._dim}), got {xq.shape}")
        k = min(int(k), MAX_TOPK)
        where = "" if label is None else f"label == {_quote(label)}"
        found: list[list[tuple[float, int]]] = [[] for _ in range(len(xq))]
        todo = list(range(len(xq)))
        want = min(MAX_TOPK, k + max(8, k // 4))
        while todo:
            answer = self._client.search(
                self.spec.collection,
                data=[xq[row] for row in todo],
                limit=want,
                filter=where,
                output_fields=[],
                search_params={"metric_type": "IP", "params": self._search_params(want)},
                consistency_level="Strong",
            )
            left = []
            for row, hits in zip(todo, answer, strict=True):
                pairs = sorted((-float(h["distance"]), int(h["id"])) for h in hits)
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
        return scores, ids

    def _search_params(self, limit: int) -> dict[str, Any]:
        return _search_params(self._index["index_type"], self._index.get("params", {}), limit)

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
            shas = sorted({r.content_sha256 for r in records if r.content_sha256})
            existing = self._ids_by_sha256(shas)
            ids = [0] * len(records)
            first_of: dict[str, int] = {}
            fresh, repeated = [], []
            for i, record in enumerate(records):
                sha = record.content_sha256
                if sha is not None and (sha in existing or sha in first_of):
                    ids[i] = existing.get(sha, 0)
                    repeated.append(i)
                    continue
                if sha is not None:
                    first_of[sha] = i
                fresh.append(i)
            new_ids = self._new_ids(len(fresh))
            now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            rows = [
                _row(new_id, records[i], x[i], now)
                for i, new_id in zip(fresh, new_ids, strict=True)
            ]
            for chunk in _chunks(rows):
                self._client.insert(self.spec.collection, list(chunk))
            for i, new_id in zip(fresh, new_ids, strict=True):
                ids[i] = new_id
            for i in repeated:
                ids[i] = ids[i] or ids[first_of[str(records[i].content_sha256)]]
        return AddResult(ids, new_ids, [(i, ids[i]) for i in repeated])

    def _new_ids(self, count: int) -> list[int]:
        """``count`` consecutive ids no item has (see the module docstring)."""
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
        for chunk in _chunks(list(shas)):
            rows = self._client.query(
                self.spec.collection,
                filter=f"content_sha256 in [{', '.join(_quote(s) for s in chunk)}]",
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
        for chunk in _chunks([int(i) for i in ids]):
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
            for chunk in _chunks(wanted):
                self._client.delete(self.spec.collection, ids=list(chunk))
        return wanted

    def get(self, ids: Sequence[int]) -> dict[int, Item]:
        out: dict[int, Item] = {}
        for chunk in _chunks([int(i) for i in ids]):
            rows = self._client.get(
                self.spec.collection, ids=list(chunk), output_fields=list(FIELDS)
            )
            out.update((int(r["id"]), _item(r)) for r in rows)
        return out

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
            filter=f"content_sha256 == {_quote(sha256.lower())}",
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
            "collection": self.spec.collection,
            "index_type": self._index["index_type"],
            "params": dict(self._index.get("params", {})),
            "metric": "IP",
        }

    def verify(self, sample: int = 100) -> list[str]:
        """Problems found: the collection's schema and dimension, and a sample of its items
        each found first (score ~1) with its own vector."""
        try:
            _check_collection(self._client, self.spec, self._dim)
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
        if self.spec.kind == "milvus-lite" and self.spec.path is not None:
            _release_lite(self.spec.path)

    def __enter__(self) -> MilvusBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MilvusBackend({self.spec.where})"


def _row(item_id: int, record: ItemRecord, vector: np.ndarray, added_at: str) -> dict[str, Any]:
    return {
        "id": int(item_id),
        "vector": vector,
        "label": record.label,
        "uri": record.uri,
        "extra": dict(record.extra),
        "content_sha256": record.content_sha256,
        "added_at": added_at,
    }


def _create_collection(client: Any, name: str, dim: int, index: IndexChoice) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("label", DataType.VARCHAR, max_length=1024, nullable=True)
    schema.add_field("uri", DataType.VARCHAR, max_length=4096)
    schema.add_field("extra", DataType.JSON)
    schema.add_field("content_sha256", DataType.VARCHAR, max_length=64, nullable=True)
    schema.add_field("added_at", DataType.VARCHAR, max_length=64)
    params = client.prepare_index_params()
    params.add_index(
        field_name="vector", index_type=index.index_type, metric_type="IP", params=index.params
    )
    client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")


def _check_collection(client: Any, spec: BackendSpec, dim: int) -> dict[str, Any]:
    """The collection's vector index description, after checking its fields and dimension."""
    info = client.describe_collection(spec.collection)
    fields = {f["name"]: f for f in info["fields"]}
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise BackendError(
            f"{spec.where} is not an item collection (no field {', '.join(missing)}): "
            "name another collection, or push the bundle into a new one"
        )
    got = int(fields["vector"].get("params", {}).get("dim", -1))
    if got != dim:
        raise BackendError(
            f"{spec.where} holds {got}-d vectors but the bundle's model gives {dim}-d: "
            "push this bundle into another collection"
        )
    index = client.describe_index(spec.collection, "vector") or {}
    params = index.get("params")
    if isinstance(params, str):
        params = json.loads(params)
    if params is None:
        params = {k: v for k, v in index.items() if k in ("M", "efConstruction", "nlist")}
    params = {k: int(v) for k, v in params.items() if str(v).isdigit()}
    metric = str(index.get("metric_type", "IP")).upper()
    if metric != "IP":
        raise BackendError(f"{spec.where} has a {metric} index; items are searched by IP")
    return {"index_type": str(index.get("index_type", "FLAT")), "params": params}


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
    batch_size: int = _BATCH,
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
    from retrieval.bundle.items import STORE_FILE

    folder = Path(bundle)
    dim = int(read_manifest(folder)["embedding_dim"])
    store = ItemStore.open(folder / STORE_FILE)
    try:
        if store.dim != dim:
            raise BackendError(
                f"{folder}: its item store holds {store.dim}-d vectors, its manifest says {dim}"
            )
        return push_store(store, spec, batch_size, progress)
    finally:
        store.close()


def push_store(
    store: ItemStore,
    spec: BackendSpec,
    batch_size: int = _BATCH,
    progress: Callable[[int], None] | None = None,
) -> PushReport:
    """:func:`push_bundle` from an open item store."""
    index = choose_index(store.active_count)
    with MilvusBackend.connect(spec, store.dim, create=index) as backend:
        removed = store.removed_since(0, store.max_id).tolist()
        gone = sorted(backend.present(removed))
        for chunk in _chunks(gone):
            backend._client.delete(spec.collection, ids=list(chunk))
        pushed = present = 0
        for ids, _ in store.iter_active(chunk_size=batch_size):
            there = backend.present(ids.tolist())
            missing = [int(i) for i in ids if int(i) not in there]
            present += len(there)
            if missing:
                rows = [
                    _row(
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

"""The item collection: its fields and vector index (made, checked, loaded, and rebuilt from
the stored vectors when it cannot be loaded), rows to and from items, and the filter literals
and request batches that reads and writes use.

Two layouts of the text fields: where the server has nullable fields (Milvus 2.5 on, Milvus
Lite) ``label`` and ``content_sha256`` are nullable and an item without one holds null; on
older servers (2.3, 2.4) they are plain VARCHAR and "none" is stored as empty text, which no
label (1 or more characters) and no sha256 (64) can be. A collection's layout is read from its
schema when it is opened, so one made by either is read right by every version of the backend;
equality filters on a label or a hash find the same items in both.

The record of the items removed through the engine, so that ``retrieval push`` does not
bring them back.

Beside the item collection ``NAME`` the backend keeps ``NAME__removed``: one row per id removed
through :meth:`MilvusBackend.remove <retrieval.backends.milvus.MilvusBackend.remove>` (``id``
and ``removed_at``; Milvus collections need a vector field, so each row also holds a fixed 2-d
placeholder ``mark``). A removal is recorded before the item's row is deleted, so every
acknowledged removal has its record, and push leaves out the bundle items recorded here. The
record is made with a new item collection (an older one left under the name is dropped first)
or, beside a collection pushed by an older version, when the collection is first opened for
writing.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.backends.base import BackendError, BackendSpec
from retrieval.bundle.records import MAX_LABEL, MAX_URI, Item, ItemRecord, text_problem

__all__ = [
    "BATCH",
    "FIELDS",
    "IndexChoice",
    "SUFFIX",
    "check_collection",
    "choose_index",
    "chunks",
    "drop_removals",
    "index_params",
    "item_of",
    "label_filter",
    "load_problem",
    "nullable_text",
    "open_collection",
    "open_removals",
    "quote",
    "rebuild_index",
    "record_removals",
    "recorded_removals",
    "row_of",
    "vector_index",
]


FIELDS = ("id", "vector", "label", "uri", "extra", "content_sha256", "added_at")


BATCH = 1000  # ids per get / query / insert request


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


#: what a string literal of a filter cannot hold as itself: Milvus's grammar (and Milvus
#: Lite's) ends a literal at a raw line break and reads these escapes
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def quote(text: str) -> str:
    """A Milvus filter string literal that reads back as ``text``."""
    return '"' + text.translate(_ESCAPES) + '"'


def label_filter(label: str) -> str | None:
    """The filter on ``label``, or None for a label no item can have (not well-formed text as
    :func:`~retrieval.bundle.records.text_problem` says, or not encodable as UTF-8)."""
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if text_problem(label, MAX_LABEL, nullable=False) is not None:
        return None
    return f"label == {quote(label)}"


def chunks(values: Sequence[Any], size: int = BATCH) -> Iterator[Sequence[Any]]:
    """``values`` in consecutive slices of at most ``size``."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def item_of(row: dict[str, Any]) -> Item:
    """The item a collection row holds (empty text or null: no label, no sha256)."""
    vector = np.asarray(row["vector"], dtype=np.float32)
    extra = row.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    return Item(
        int(row["id"]),
        str(row["uri"]),
        row.get("label") or None,
        dict(extra),
        row.get("content_sha256") or None,
        str(row.get("added_at") or ""),
        None,
        vector,
    )


def row_of(
    item_id: int, record: ItemRecord, vector: np.ndarray, added_at: str, nullable: bool = True
) -> dict[str, Any]:
    """The collection row of an item; no label or sha256 is null in a ``nullable`` layout,
    empty text in the other (see the module doc)."""
    none = None if nullable else ""
    return {
        "id": int(item_id),
        "vector": vector,
        "label": none if record.label is None else record.label,
        "uri": record.uri,
        "extra": dict(record.extra),
        "content_sha256": none if record.content_sha256 is None else record.content_sha256,
        "added_at": added_at,
    }


def index_params(client: Any, index: IndexChoice, field: str = "vector") -> Any:
    """The ``create_index`` parameters of an IP index on ``field``."""
    params = client.prepare_index_params()
    params.add_index(
        field_name=field, index_type=index.index_type, metric_type="IP", params=index.params
    )
    return params


_UTF8 = 4  # the most bytes a character takes in UTF-8


def _create_collection(
    client: Any, name: str, dim: int, index: IndexChoice, nullable: bool
) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    # nullable is left out on servers without it (older ones refuse the field's schema)
    may_be_null = {"nullable": True} if nullable else {}
    # Milvus counts a VARCHAR's max_length in UTF-8 bytes, the item store in characters
    schema.add_field("label", DataType.VARCHAR, max_length=_UTF8 * MAX_LABEL, **may_be_null)
    schema.add_field("uri", DataType.VARCHAR, max_length=_UTF8 * MAX_URI)
    schema.add_field("extra", DataType.JSON)
    schema.add_field("content_sha256", DataType.VARCHAR, max_length=64, **may_be_null)
    schema.add_field("added_at", DataType.VARCHAR, max_length=64)
    client.create_collection(
        name, schema=schema, index_params=index_params(client, index), consistency_level="Strong"
    )


def vector_index(client: Any, name: str, field: str = "vector") -> dict[str, Any] | None:
    """The collection's index on ``field`` as ``describe_index`` reports it (type, metric and
    integer build parameters), or None when it has none."""
    from pymilvus import MilvusException

    try:
        index = client.describe_index(name, field)
    except MilvusException:  # a Milvus server answers "index not found" with an error
        return None
    if not index:
        return None
    params = index.get("params")
    if isinstance(params, str):
        params = json.loads(params)
    if params is None:
        params = {k: v for k, v in index.items() if k in ("M", "efConstruction", "nlist")}
    return {
        "index_type": str(index.get("index_type", "FLAT")),
        "params": {k: int(v) for k, v in params.items() if str(v).isdigit()},
        "metric": str(index.get("metric_type", "IP")).upper(),
    }


def nullable_text(client: Any, name: str) -> bool:
    """Whether the collection's ``label`` and ``content_sha256`` take null (its layout, see
    the module doc)."""
    fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
    return bool(fields["label"].get("nullable", False))


def check_collection(client: Any, spec: BackendSpec, dim: int) -> dict[str, Any] | None:
    """The collection's vector index description (None when it has no index), after checking
    its fields, dimension and metric."""
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
    index = vector_index(client, spec.collection)
    metric = index.pop("metric") if index is not None else "IP"
    if metric != "IP":
        raise BackendError(f"{spec.where} has a {metric} index; items are searched by IP")
    return index


def load_problem(client: Any, name: str, has_index: bool) -> str:
    """Why the collection ``name`` cannot be loaded for search ("" once it is loaded)."""
    if not has_index:
        return "it has no vector index"
    try:
        client.load_collection(name)
    except Exception as err:  # the engine's errors, of every kind
        reason = str(getattr(err, "message", None) or err or type(err).__name__)
        return f"its vector index cannot be loaded ({reason.splitlines()[0][:300]})"
    return ""


def rebuild_index(client: Any, name: str, index: IndexChoice, field: str = "vector") -> None:
    """Drop the collection's index on ``field`` (and the index files a killed process may
    have torn) and build ``index`` again from the stored vectors, then load the collection.
    The rows are not touched."""
    with contextlib.suppress(Exception):  # one that never loaded may refuse to be released
        client.release_collection(name)
    if vector_index(client, name, field) is not None:
        client.drop_index(name, field)
    client.create_index(name, index_params(client, index, field))
    client.load_collection(name)


def open_collection(
    client: Any,
    spec: BackendSpec,
    dim: int,
    create: IndexChoice | None,
    repair: bool = False,
    nullable: bool = True,
) -> tuple[dict[str, Any], str]:
    """Check (with ``create``, first make if missing, its text fields ``nullable`` where the
    server has that) and load the collection of ``spec``:
    its vector index description (see :func:`check_collection`) and what was repaired ("" if
    nothing). A collection whose vector index is missing or cannot be loaded (a Milvus Lite
    index file torn by a process killed while writing it) is a BackendError naming
    ``retrieval push --repair``; with ``repair`` (and ``create``: the index to build) the
    index is rebuilt from the stored vectors instead (see :func:`rebuild_index`)."""
    if not client.has_collection(spec.collection):
        if create is None:
            raise BackendError(
                f"no {spec.where}: fill it first with 'retrieval push BUNDLE {spec.text}'"
            )
        _create_collection(client, spec.collection, dim, create, nullable)
    index = check_collection(client, spec, dim)
    problem = load_problem(client, spec.collection, index is not None)
    if not problem:
        assert index is not None
        return index, ""
    if not repair or create is None:
        raise BackendError(
            f"{spec.where} cannot be searched: {problem}: rebuild the index from its stored "
            f"vectors with 'retrieval push BUNDLE {spec.text} --repair'"
        )
    rebuild_index(client, spec.collection, create)
    index = check_collection(client, spec, dim)
    assert index is not None
    rows = client.query(
        spec.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
    )
    return index, (
        f"repaired {spec.where}: {problem}; rebuilt its {create.index_type} index from its "
        f"{int(rows[0]['count(*)'])} stored vectors"
    )


SUFFIX = "__removed"


_INDEX = IndexChoice("FLAT", {}, {})


_MARK = [1.0, 0.0]


def _name(collection: str) -> str:
    return collection + SUFFIX


def _create(client: Any, name: str) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("removed_at", DataType.VARCHAR, max_length=64)
    schema.add_field("mark", DataType.FLOAT_VECTOR, dim=len(_MARK))
    try:
        client.create_collection(
            name,
            schema=schema,
            index_params=index_params(client, _INDEX, "mark"),
            consistency_level="Strong",
        )
    except Exception:
        if not client.has_collection(name):
            raise  # not another replica making it at the same moment


def drop_removals(client: Any, collection: str) -> None:
    """Drop the record kept beside ``collection`` (before a new collection of that name)."""
    if client.has_collection(_name(collection)):
        client.drop_collection(_name(collection))


def open_removals(client: Any, spec: BackendSpec, repair: bool) -> str:
    """Make (if missing) and load the record beside the collection of ``spec``; what was
    repaired ("" if nothing). An index that cannot be loaded is a BackendError naming
    ``retrieval push --repair``, or with ``repair`` is rebuilt."""
    name = _name(spec.collection)
    if not client.has_collection(name):
        _create(client, name)
    problem = load_problem(client, name, vector_index(client, name, "mark") is not None)
    if not problem:
        return ""
    if not repair:
        raise BackendError(
            f"the removal record '{name}' of {spec.where} cannot be searched: {problem}: "
            f"rebuild its index with 'retrieval push BUNDLE {spec.text} --repair'"
        )
    rebuild_index(client, name, _INDEX, "mark")
    return f"repaired the removal record '{name}' of {spec.where}: {problem}; rebuilt its index"


def record_removals(client: Any, collection: str, ids: Sequence[int], when: str) -> None:
    """Record that ``ids`` were removed at ``when`` (durable when this returns)."""
    for chunk in chunks([int(i) for i in ids]):
        rows = [{"id": i, "removed_at": when, "mark": _MARK} for i in chunk]
        client.upsert(_name(collection), rows)


def recorded_removals(client: Any, collection: str, ids: Sequence[int]) -> set[int]:
    """The ids among ``ids`` whose removal through the engine is recorded."""
    out: set[int] = set()
    for chunk in chunks([int(i) for i in ids]):
        rows = client.query(
            _name(collection),
            filter=f"id in [{', '.join(str(i) for i in chunk)}]",
            output_fields=["id"],
            consistency_level="Strong",
        )
        out.update(int(r["id"]) for r in rows)
    return out

"""The item collection: its fields and vector index, rows to and from items, and the
filter literals and request batches that reads and writes use."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.backends.base import BackendError
from retrieval.backends.spec import BackendSpec
from retrieval.bundle.records import Item, ItemRecord

__all__ = [
    "BATCH",
    "FIELDS",
    "IndexChoice",
    "chunks",
    "choose_index",
    "item_of",
    "open_collection",
    "quote",
    "row_of",
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


def quote(text: str) -> str:
    """A Milvus filter string literal (labels and hashes hold no control characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chunks(values: Sequence[Any], size: int = BATCH) -> Iterator[Sequence[Any]]:
    """``values`` in consecutive slices of at most ``size``."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def item_of(row: dict[str, Any]) -> Item:
    """The item a collection row holds."""
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


def row_of(item_id: int, record: ItemRecord, vector: np.ndarray, added_at: str) -> dict[str, Any]:
    """The collection row of an item."""
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


def check_collection(client: Any, spec: BackendSpec, dim: int) -> dict[str, Any]:
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


def open_collection(
    client: Any, spec: BackendSpec, dim: int, create: IndexChoice | None
) -> dict[str, Any]:
    """Check (with ``create``, first make if missing) and load the collection of ``spec``;
    its vector index description (see :func:`check_collection`)."""
    if not client.has_collection(spec.collection):
        if create is None:
            raise BackendError(
                f"no {spec.where}: fill it first with 'retrieval push BUNDLE {spec.text}'"
            )
        _create_collection(client, spec.collection, dim, create)
    index = check_collection(client, spec, dim)
    client.load_collection(spec.collection)
    return index

"""The record of the items removed through the engine, so that ``retrieval push`` does not
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

from collections.abc import Sequence
from typing import Any

from retrieval.backends.base import BackendError
from retrieval.backends.milvus.collection import (
    IndexChoice,
    chunks,
    index_params,
    load_problem,
    rebuild_index,
    vector_index,
)
from retrieval.backends.spec import BackendSpec

__all__ = ["SUFFIX", "drop_removals", "open_removals", "record_removals", "recorded_removals"]

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

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

Modules: :mod:`~retrieval.backends.milvus.engine` (the client, Milvus Lite servers),
:mod:`~retrieval.backends.milvus.collection` (fields, index, rows),
:mod:`~retrieval.backends.milvus.search` (ranked search with the tie rule),
:mod:`~retrieval.backends.milvus.backend` (:class:`MilvusBackend`) and
:mod:`~retrieval.backends.milvus.push` (``retrieval push``).
"""

from retrieval.backends.milvus.backend import MilvusBackend
from retrieval.backends.milvus.collection import FIELDS, IndexChoice, choose_index
from retrieval.backends.milvus.push import PushReport, push_bundle, push_store
from retrieval.backends.milvus.search import MAX_TOPK

__all__ = [
    "FIELDS",
    "MAX_TOPK",
    "IndexChoice",
    "MilvusBackend",
    "PushReport",
    "choose_index",
    "push_bundle",
    "push_store",
]

"""The Milvus backend: a bundle's items searched in a Milvus collection through ``pymilvus``.

Milvus servers from 2.3 on and Milvus Lite: the server's version is read when connecting.
One collection per bundle, one row per active item: ``id`` (INT64 primary key, the bundle's
ids), ``vector`` (FLOAT_VECTOR, metric IP), ``label`` and ``content_sha256`` (VARCHAR, null
or, on servers without nullable fields, empty text for none), ``uri``, ``added_at`` (VARCHAR)
and ``extra`` (JSON). Collections are created with
``Strong`` consistency and searched and queried with it, so every process that points at the
engine sees a write once it has returned: replicas of ``retrieval serve`` share adds and
removals. Rows are written by id (upserts): a row written twice is there once. Removed items
are deleted from the collection and recorded beside it
(:mod:`~retrieval.backends.milvus.collection`), so ``retrieval push`` does not bring them back.

Results follow the house rule: inner products of unit vectors, equal scores by ascending id
(Milvus orders ties arbitrarily, so a search asks for more than ``k`` and searches deeper while
a group of equal scores straddles the ``k``-th place).

Items added through this backend get ids above every bundle id and below 2**53 (exact in
JavaScript). An image with a sha256 gets 2**52 plus the first 52 bits of its hash (the next
id up on the rare clash with another image), so replicas adding the same image at once write
the same row and the image is there once. An item without a sha256 gets an id from the clock
(seconds since 2020 in the high bits, a random start in the low 21): below 2**52 until 2088,
increasing within a process, and checked unused before it is written.

Milvus Lite writes its index files in place, so a process killed while writing one leaves it
torn and the collection cannot be loaded; ``retrieval push --repair`` rebuilds the index from
the stored vectors (every row, those added through the engine included, is kept).

Modules: :mod:`~retrieval.backends.milvus.engine` (the client, the server's version, Milvus
Lite servers),
:mod:`~retrieval.backends.milvus.collection` (fields, index, rows),
:mod:`~retrieval.backends.milvus.collection` (the record of removed items),
:mod:`~retrieval.backends.milvus.backend` (ranked search with the tie rule),
:mod:`~retrieval.backends.milvus.backend` (:class:`MilvusBackend`),
:mod:`~retrieval.backends.milvus.push` (``retrieval push``) and
:mod:`~retrieval.backends.milvus.standalone` (a Milvus server on loopback, for tests and
benchmarks).
"""

from retrieval.backends.milvus.backend import MAX_TOPK, MilvusBackend
from retrieval.backends.milvus.collection import FIELDS, IndexChoice, choose_index
from retrieval.backends.milvus.push import PushReport, push_bundle, push_store

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

"""Search backends: where a bundle's items and vectors are searched.

- the bundle itself (:class:`retrieval.bundle.items.IndexedItems`: FAISS + SQLite in the
  bundle folder), the default;
- a Milvus collection (:class:`retrieval.backends.milvus.MilvusBackend`, through ``pymilvus``):
  a Milvus server or cluster (``milvus://HOST:PORT/COLLECTION``) or Milvus Lite embedded in the
  process (``milvus-lite:PATH``). Install with ``pip install -e ".[milvus]"``.

Both follow :class:`SearchBackend`. :func:`open_backend` opens one from its spec string;
pymilvus is imported only then, so the base install works without it.
"""

from retrieval.backends.base import BackendError, BackendSpec, SearchBackend, parse_backend

__all__ = ["BackendError", "BackendSpec", "SearchBackend", "open_backend", "parse_backend"]


def open_backend(spec: str, dim: int, read_only: bool = False) -> SearchBackend:
    """The Milvus backend that ``spec`` names (see :func:`parse_backend`), its collection
    checked to hold ``dim``-d vectors. Raises BackendError (one line naming the spec and
    what is wrong) for a malformed spec, a missing pymilvus, an unreachable engine, a
    missing collection or one of another dimension."""
    parsed = parse_backend(spec)
    from retrieval.backends.milvus import MilvusBackend

    return MilvusBackend.connect(parsed, dim, read_only=read_only)

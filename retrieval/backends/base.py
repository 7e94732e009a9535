"""The interface every search backend follows: one embedding convention (L2-normalised
float32, scored by inner product), one tie rule (equal scores by ascending id).

A backend is named by a spec string (:func:`parse_backend`): ``milvus://HOST:PORT/COLLECTION``
or ``milvus-lite:PATH[#COLLECTION]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from retrieval.bundle.records import AddResult, Item, ItemRecord

__all__ = ["BackendError", "BackendSpec", "DEFAULT_COLLECTION", "SearchBackend", "parse_backend"]


class BackendError(ValueError):
    """A backend that cannot be used as given: malformed spec, unreachable engine, missing
    client library, a collection that does not fit the bundle. The message is one line."""


@runtime_checkable
class SearchBackend(Protocol):
    """Items (id, uri, label, extra fields, sha256 of the image, vector) and search over them.

    Implemented by :class:`retrieval.bundle.items.IndexedItems` (the bundle's FAISS index and
    SQLite store) and :class:`retrieval.backends.milvus.MilvusBackend`.
    """

    @property
    def dim(self) -> int:
        """Vector dimension."""

    @property
    def ntotal(self) -> int:
        """Number of active items (the count)."""

    def search(
        self, vectors: np.ndarray, k: int, label: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` best active items of each query row (with ``label``
        only), best first, equal scores by ascending id: (n, k') float32 inner products and
        int64 ids, ``k' <= k``; -1 ids where fewer were found. ``vectors`` (n, dim) unit rows
        and ``k >= 1`` are checked by the caller (:meth:`Retriever.search
        <retrieval.search.retriever.Retriever.search>`), not again here."""

    def add(
        self,
        records: Sequence[ItemRecord],
        vectors: np.ndarray,
        base_vectors: np.ndarray | None = None,
        dba: tuple[int, float] | None = None,
    ) -> AddResult:
        """Add items (durable when this returns); records whose ``content_sha256`` an active
        item has are not added again (see :class:`AddResult`)."""

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Remove items (durable when this returns); KeyError for ids it does not hold."""

    def get(self, ids: Sequence[int]) -> dict[int, Item]:
        """The active items among ``ids`` by id (unknown and removed ids left out)."""

    def hit_records(self, ids: Sequence[int]) -> dict[int, Item]:
        """The records of the hits ``ids`` of this thread's last :meth:`search`, as
        :meth:`get` gives them but whose ``vector`` may be empty: what a result shows. A
        backend may read them with the search (one round trip to an engine instead of two)."""

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), dim) float32 stored vectors in the order asked; KeyError if unknown."""

    def find_by_sha256(self, sha256: str) -> list[int]:
        """Ids of the active items whose image bytes have this sha256, increasing."""

    def removed_uris(self) -> set[str]:
        """Uris of removed items the backend still remembers (the bundle keeps them)."""

    def check_writable(self) -> None:
        """Raise (ReadOnlyError) when adds and removals are not allowed."""

    def describe(self) -> dict[str, Any]:
        """What serves the searches: kind, location, index type and parameters."""

    def verify(self) -> list[str]:
        """Problems found, ``[]`` when healthy."""

    def close(self) -> None:
        """Release the backend (idempotent)."""


#: the collection of a ``milvus-lite:PATH`` spec without ``#COLLECTION``
DEFAULT_COLLECTION = "retrieval"


# Milvus's rule for names (at most 255), less room for the removal record beside it
# (NAME__removed: see retrieval.backends.milvus.collection)
_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,245}")


_FORMS = "milvus://HOST:PORT/COLLECTION or milvus-lite:PATH[#COLLECTION]"


@dataclass(frozen=True)
class BackendSpec:
    """A parsed spec: ``kind`` ``"milvus"`` (``uri`` is ``http://HOST:PORT``) or
    ``"milvus-lite"`` (``path``: the Milvus Lite data folder), and the collection."""

    kind: str
    collection: str
    uri: str = ""
    path: Path | None = None
    text: str = ""

    @property
    def where(self) -> str:
        """The engine and collection, as messages name them."""
        place = self.uri if self.kind == "milvus" else f"Milvus Lite at {self.path}"
        return f"collection '{self.collection}' on {place}"


def _collection(name: str, spec: str) -> str:
    if not _COLLECTION.fullmatch(name):
        raise BackendError(
            f"backend {spec!r}: collection name {name!r} must start with a letter or '_' "
            "and hold only letters, digits and '_' (at most 246)"
        )
    return name


def parse_backend(spec: str) -> BackendSpec:
    """Parse ``milvus://HOST:PORT/COLLECTION`` or ``milvus-lite:PATH[#COLLECTION]``
    (collection default :data:`DEFAULT_COLLECTION`). Raises BackendError naming the spec
    and the part that is wrong."""
    if spec.startswith("milvus://"):
        match = re.fullmatch(r"milvus://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+):(\d{1,5})/([^/]*)/?", spec)
        if match is None:
            raise BackendError(f"backend {spec!r} is not of the form milvus://HOST:PORT/COLLECTION")
        host, port, name = match.groups()
        if not 0 < int(port) < 65536:
            raise BackendError(f"backend {spec!r}: port {port} is not between 1 and 65535")
        if not name:
            raise BackendError(
                f"backend {spec!r} names no collection (milvus://HOST:PORT/COLLECTION)"
            )
        return BackendSpec(
            "milvus", _collection(name, spec), uri=f"http://{host}:{port}", text=spec
        )
    if spec.startswith("milvus-lite:"):
        rest = spec.removeprefix("milvus-lite:")
        path, _, name = rest.partition("#")
        if not path:
            raise BackendError(f"backend {spec!r} names no folder (milvus-lite:PATH)")
        collection = _collection(name, spec) if name else DEFAULT_COLLECTION
        return BackendSpec("milvus-lite", collection, path=Path(path).resolve(), text=spec)
    raise BackendError(f"backend {spec!r}: unknown backend; use {_FORMS}")

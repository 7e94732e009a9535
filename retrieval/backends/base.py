"""The interface every search backend follows: one embedding convention (L2-normalised
float32, scored by inner product), one tie rule (equal scores by ascending id)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from retrieval.bundle.additions import AddResult
from retrieval.bundle.records import Item, ItemRecord

__all__ = ["BackendError", "SearchBackend"]


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

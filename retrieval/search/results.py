"""What a :class:`~retrieval.search.retriever.Retriever` answers: the hits of a search and the
report of an add."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from retrieval.bundle.records import Item

__all__ = ["AddReport", "Hit", "row_hits"]


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its score (cosine similarity) and what it points to."""

    id: int
    score: float
    uri: str
    label: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def row_hits(scores: np.ndarray, ids: np.ndarray, records: Mapping[int, Item]) -> list[Hit]:
    """The hits of one result row ``(scores, ids)`` in its order, from the ``records`` read
    for its ids: empty slots (-1) and items missing from ``records`` or no longer active
    are left out."""
    hits = []
    for score, item_id in zip(scores, ids, strict=True):
        item = records.get(int(item_id))
        if item is None or not item.active:
            continue
        hits.append(Hit(item.id, float(score), item.uri, item.label, dict(item.extra)))
    return hits


@dataclass
class AddReport:
    """What :meth:`Retriever.add <retrieval.search.retriever.Retriever.add>` did: ids of new
    items, duplicates of items already in the bundle (``(path, existing id)``) and files that
    could not be read (``(path, reason)``)."""

    added: list[int] = field(default_factory=list)
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

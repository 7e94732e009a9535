"""The items of a bundle as the code passes them around: :class:`ItemRecord` (what describes
a vector to add, validated on construction), :class:`Item` (an item as stored) and
:class:`StoreError` (an item table file that cannot be read)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.bundle.item_checks import MAX_LABEL, MAX_URI, text_problem

__all__ = ["Item", "ItemRecord", "StoreError"]


class StoreError(ValueError):
    """An item table file is missing pieces, foreign, damaged or from a newer version."""


@dataclass(frozen=True)
class ItemRecord:
    """What describes one vector to add (validated on construction).

    ``uri``: image path or URI (non-empty). ``extra``: JSON-serialisable fields.
    ``content_sha256``: hex sha256 of the image file bytes (stored lower-case) or None.
    """

    uri: str
    label: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    content_sha256: str | None = None

    def __post_init__(self) -> None:
        for name, limit in (("uri", MAX_URI), ("label", MAX_LABEL)):
            problem = text_problem(getattr(self, name), limit, nullable=name == "label")
            if problem:
                raise ValueError(f"ItemRecord.{name} {problem}")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"ItemRecord.extra must be a mapping, got {type(self.extra)}")
        try:
            json.dumps(dict(self.extra), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"ItemRecord.extra of {self.uri!r} is not JSON: {err}") from err
        sha = self.content_sha256
        if sha is not None:
            ok = isinstance(sha, str) and len(sha) == 64
            if not ok or any(c not in "0123456789abcdefABCDEF" for c in sha):
                raise ValueError(f"content_sha256 of {self.uri!r} must be 64 hex digits: {sha!r}")
            object.__setattr__(self, "content_sha256", sha.lower())


@dataclass(frozen=True)
class Item:
    """A stored item; ``removed_seq`` is None while it is active. ``vector``: (dim,) float32."""

    id: int
    uri: str
    label: str | None
    extra: dict[str, Any]
    content_sha256: str | None
    added_at: str
    removed_seq: int | None
    vector: np.ndarray

    @property
    def active(self) -> bool:
        """Whether the item has not been removed."""
        return self.removed_seq is None

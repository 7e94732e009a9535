"""The items of a bundle as the code passes them around, and what a well-formed one is.

- :class:`ItemRecord`: what describes a vector to add, validated on construction;
  :class:`Item`: an item as stored; :class:`Snapshot`: an index file as recorded in the item
  table; :class:`StoreError`: an item table file that cannot be read.
- The checks: a vector is finite with a unit L2 norm, a uri or label is text without control
  characters of bounded length, ``extra`` a JSON object, a sha256 64 hex digits. They refuse
  bad input before it is stored and find damage in stored rows.

What an add does with repeated images, for every search backend: a record whose
``content_sha256`` an active item has, or an earlier record of the same call, is not added;
its id is the existing one. Records without ``content_sha256`` are always added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.infra.checks import checked_vectors, unit_rows

__all__ = [
    "AddPlan",
    "AddResult",
    "Item",
    "ItemRecord",
    "MAX_LABEL",
    "MAX_URI",
    "NORM_TOLERANCE",
    "Snapshot",
    "StoreError",
    "blob_problems",
    "check_vectors",
    "listed",
    "plan_add",
    "row_problems",
    "text_problem",
]


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


@dataclass(frozen=True)
class Snapshot:
    """An index file as written: it holds, in id order, the items with ``id <= max_id`` not
    removed by removal ``removal_seq`` (``ntotal`` of them). ``id`` / ``created_at`` are
    filled in by :meth:`ItemTable.record_snapshot`."""

    index_sha256: str
    ntotal: int
    max_id: int
    removal_seq: int
    factory: str
    search_params: str
    created_at: str = ""
    id: int = 0


NORM_TOLERANCE = 1e-3


MAX_URI = 4096  # characters; a path or URI longer than PATH_MAX is damage, not data


MAX_LABEL = 1024


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_vectors(x: Any, dim: int, n: int | None = None, name: str = "vectors") -> np.ndarray:
    """``x`` as C-contiguous float32 when it is (n, dim) finite rows of unit L2 norm (1e-3)."""
    return unit_rows(checked_vectors(x, name, dim=dim, rows=n), name, NORM_TOLERANCE)


def text_problem(value: Any, limit: int, nullable: bool) -> str | None:
    """Why ``value`` is not a well-formed uri / label (None when it is): text of 1 to
    ``limit`` characters without control characters, or None where ``nullable``."""
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string{' or null' if nullable else ''}, got {value!r:.80}"
    if len(value) > limit:
        return f"is {len(value)} characters long, more than {limit}"
    if _CONTROL.search(value):
        return f"contains control characters: {value!r:.80}"
    return None


def row_problems(uri: Any, label: Any, extra: Any, sha: Any) -> list[str]:
    """What is wrong with one item row's text columns (kinds, not values: ids are listed)."""
    kinds = []
    for name, value, limit in (("uri", uri, MAX_URI), ("label", label, MAX_LABEL)):
        problem = text_problem(value, limit, nullable=name == "label")
        if problem:
            kinds.append(
                f"{name} not well-formed (text of 1 to {limit} characters without "
                "control characters" + (", or null)" if name == "label" else ")")
            )
    try:
        fields = json.loads(extra) if isinstance(extra, str) else None
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        kinds.append("extra is not a JSON object")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        kinds.append("content_sha256 is not 64 hex digits")
    return kinds


def blob_problems(table: str, rows: list[Any], dim: int, bad: dict[str, list[int]]) -> None:
    """Add to ``bad`` (kind of damage -> ids) the ids of the ``(id, ..., vector)`` rows of
    ``table`` whose vector BLOB is not ``dim`` finite little-endian float32 of unit norm."""
    nbytes = 4 * dim
    good = []
    for row in rows:
        blob = row[-1]
        if not isinstance(blob, bytes) or len(blob) != nbytes:
            bad.setdefault(f"{table}: vector is not {nbytes} bytes", []).append(row[0])
        else:
            good.append(row)
    if not good:
        return
    x = np.frombuffer(b"".join(r[-1] for r in good), dtype="<f4").reshape(-1, dim)
    with np.errstate(all="ignore"):
        finite = np.isfinite(x).all(axis=1)
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
    off = finite & (np.abs(norms - 1.0) > NORM_TOLERANCE)
    for mask, what in ((~finite, "NaN or infinite"), (off, "norm not 1")):
        for row in np.flatnonzero(mask):
            bad.setdefault(f"{table}: vector {what}", []).append(int(good[row][0]))


def listed(ids: Sequence[int]) -> str:
    """Ids for a message: the first 20 and how many there are."""
    shown = ", ".join(str(i) for i in ids[:20])
    return f"[{shown}{', ...' if len(ids) > 20 else ''}] ({len(ids)} ids)"


@dataclass(frozen=True)
class AddResult:
    """What an add did (:meth:`IndexedItems.add`, :meth:`SearchBackend.add`).

    ``ids``: one id per record, in record order (new or, for a duplicate, the existing one).
    ``added``: the new ids. ``duplicates``: ``(record position, existing id)`` of records
    not added because an active item (or an earlier record of the same call) has their
    ``content_sha256``.
    """

    ids: list[int]
    added: list[int]
    duplicates: list[tuple[int, int]]


@dataclass(frozen=True)
class AddPlan:
    """The records of an add split into ``fresh`` (positions of the records to add, in
    order) and ``repeated`` ones, with the ids known so far (0 where not yet known)."""

    ids: list[int]
    fresh: list[int]
    repeated: list[int]
    first_of: dict[str, int]  # sha256 -> position of its first record
    shas: list[str | None]

    def result(self, added: Sequence[int]) -> AddResult:
        """The :class:`AddResult` once the fresh records were added with ids ``added``."""
        ids = list(self.ids)
        for i, new_id in zip(self.fresh, added, strict=True):
            ids[i] = new_id
        for i in self.repeated:
            ids[i] = ids[i] or ids[self.first_of[str(self.shas[i])]]
        return AddResult(ids, list(added), [(i, ids[i]) for i in self.repeated])


def plan_add(
    records: Sequence[ItemRecord], existing: Callable[[list[str]], Mapping[str, int]]
) -> AddPlan:
    """Which of ``records`` to add. ``existing``: given the distinct sha256s of the records
    (sorted), the id of an active item for each that one has."""
    shas = [r.content_sha256 for r in records]
    known = existing(sorted({s for s in shas if s is not None}))
    ids = [0] * len(records)  # ids start at 1
    first_of: dict[str, int] = {}
    fresh: list[int] = []
    repeated: list[int] = []
    for i, sha in enumerate(shas):
        if sha is None:
            fresh.append(i)
        elif sha in first_of:
            repeated.append(i)
        else:
            first_of[sha] = i
            if sha in known:
                ids[i] = known[sha]
                repeated.append(i)
            else:
                fresh.append(i)
    return AddPlan(ids, fresh, repeated, first_of, shas)

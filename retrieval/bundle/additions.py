"""What an add does with repeated images, for every search backend: a record whose
``content_sha256`` an active item has, or an earlier record of the same call, is not added;
its id is the existing one. Records without ``content_sha256`` are always added."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from retrieval.bundle.records import ItemRecord

__all__ = ["AddPlan", "AddResult", "plan_add"]


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

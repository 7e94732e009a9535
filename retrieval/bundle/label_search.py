"""Searching the items of one label: a few are scored exactly from their stored vectors; for
many, the index is searched ever deeper and only the candidates' rows are read. Results
follow the house rule: best first, equal scores by ascending id."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np

from retrieval.postprocess.steps import top_k_by_score

if TYPE_CHECKING:
    from retrieval.bundle.item_table import ItemTable
    from retrieval.index import EmbeddingIndex

__all__ = ["EXACT_MAX", "View", "search_label", "top_k"]

#: label filters matching at most this many items score them exactly from their stored
#: vectors (O(matches) rows read); more are found by searching the index ever deeper
EXACT_MAX = 1024
#: a consistent view of the index and its position -> id array, held for the block
View = Callable[[], AbstractContextManager[tuple["EmbeddingIndex", np.ndarray]]]


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row of ``scores`` (nq, m) over the increasing ``ids`` (m,),
    equal scores by ascending id: (nq, min(k, m)) scores and ids."""
    columns = top_k_by_score(scores, k)  # ascending column is ascending id here
    return np.take_along_axis(scores, columns, axis=1), ids[columns]


def _empty(nq: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)


def search_label(
    xq: np.ndarray, k: int, label: str, table: ItemTable, ntotal: int, view: View
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of the indexed items with ``label`` for each query of ``xq``, among
    ``ntotal`` indexed items: scored exactly when reading their rows costs no more than
    checking the candidates a deeper search would bring."""
    count = table.label_count(label)  # counted in the label index: no rows read
    if count and count <= max(EXACT_MAX, 2 * k * ntotal // count):
        return _label_exact(xq, k, label, table, view)
    if count:
        return _label_deeper(xq, min(k, count), label, count, ntotal, table, view)
    return _empty(xq.shape[0])


def _label_exact(
    xq: np.ndarray, k: int, label: str, table: ItemTable, view: View
) -> tuple[np.ndarray, np.ndarray]:
    """The label's indexed items scored with their stored vectors (O(matches) rows)."""
    wanted = table.label_ids(label)
    with view() as (_, ids):
        pos = np.searchsorted(ids, wanted)  # ids increase with the position
        inside = pos < ids.size
        inside[inside] = ids[pos[inside]] == wanted[inside]  # added but not yet indexed
    members = wanted[inside]
    if members.size == 0:
        return _empty(xq.shape[0])
    scores = np.ascontiguousarray(xq, dtype=np.float32) @ table.vectors_of(members).T
    return top_k(scores, members, k)


def _label_deeper(
    xq: np.ndarray, k: int, label: str, count: int, ntotal: int, table: ItemTable, view: View
) -> tuple[np.ndarray, np.ndarray]:
    """The index searched for ever more neighbours (at first twice as many as hold ``k``
    of the label's ``count`` items on average) until each row has ``k`` of them or the
    index no more; only the candidates' rows are read. Empty slots: -1, score -inf."""
    out_scores = np.full((xq.shape[0], k), -np.inf, np.float32)
    out_ids = np.full((xq.shape[0], k), -1, np.int64)
    todo = np.arange(xq.shape[0])
    want = max(4 * k, -(-2 * k * ntotal // count))
    while todo.size:
        with view() as (index, ids):
            if index.ntotal == 0:
                break
            want = min(want, index.ntotal)
            scores, found = index.search(xq[todo], want)
            found = np.where(found >= 0, ids[np.maximum(found, 0)], -1)
            everything = want >= index.ntotal
        members = table.with_label(np.unique(found[found >= 0]), label)
        keep = np.isin(found, members)
        done = []
        for row, query in enumerate(todo):
            hits = np.flatnonzero(keep[row])[:k]
            if hits.size == k or everything or bool((found[row] < 0).any()):
                out_scores[query, : hits.size] = scores[row, hits]
                out_ids[query, : hits.size] = found[row, hits]
                done.append(row)
        todo = np.delete(todo, done)
        want *= 4
    return out_scores, out_ids

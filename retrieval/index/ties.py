"""The project's tie rule on raw faiss searches: equal scores are ordered by ascending id,
also where a group of equal scores straddles the k-th place."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["search_ties_resolved", "ties_by_ascending_id"]


def ties_by_ascending_id(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Search results with equal scores re-ordered by ascending id (missing slots, id -1,
    stay last); rows already ordered by score stay so."""
    if scores.shape[1] < 2:
        return scores, ids
    missing = ids < 0
    key = np.where(missing, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, np.where(missing, np.inf, -scores)), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def search_ties_resolved(index: Any, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` results per row of ``x`` in the faiss ``index``, with equal scores by ascending
    id, also when a group of equal scores straddles the k-th place: FAISS then keeps an
    arbitrary part of the group, so one more result is searched, and rows whose k-th score
    still equals their last one are searched again with twice as many until the group ends
    inside (or ``ntotal``)."""
    n = int(index.ntotal)
    want = min(n, k + 1)
    scores, ids = ties_by_ascending_id(*index.search(x, want))
    open_rows = np.flatnonzero((scores[:, k - 1] == scores[:, -1]) & (ids[:, -1] >= 0))
    while want < n and open_rows.size:
        want = min(n, 2 * want)
        more_scores, more_ids = ties_by_ascending_id(*index.search(x[open_rows], want))
        scores[open_rows], ids[open_rows] = (
            more_scores[:, : scores.shape[1]],
            more_ids[:, : scores.shape[1]],
        )
        still = (more_scores[:, k - 1] == more_scores[:, -1]) & (more_ids[:, -1] >= 0)
        open_rows = open_rows[still]
    return scores[:, :k], ids[:, :k]

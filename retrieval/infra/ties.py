"""The one order of search results in the project: higher score first, equal scores by
ascending id, empty slots (id -1) last, as FAISS and pytorch-metric-learning order them.
Every search path (FAISS, the item table, Milvus, evaluation, the search-time steps) orders
its results with these functions."""

from __future__ import annotations

import numpy as np

__all__ = ["by_score_then_id", "top_k_columns"]


def by_score_then_id(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``(scores, ids)`` (..., k) ordered by descending score, equal scores by
    ascending id, slots with id -1 last whatever their score; values and dtypes unchanged."""
    missing = ids < 0
    key = np.where(missing, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, np.where(missing, np.inf, -scores)), axis=-1)
    return np.take_along_axis(scores, order, axis=-1), np.take_along_axis(ids, order, axis=-1)


def top_k_columns(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Column indices of the ``k`` largest scores of each row, best first, equal scores by
    ascending column; ``exclude`` (nq,) drops one column per row (a query's own position).

    ``scores`` is (nq, n); returns (nq, min(k, n - (exclude is not None))) int64.
    """
    s = np.asarray(scores, dtype=np.float32)
    nq, n = s.shape
    if exclude is not None:
        s = s.copy()
        s[np.arange(nq), np.asarray(exclude, dtype=np.int64)] = -np.inf
        n -= 1
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros((nq, 0), dtype=np.int64)
    # the k-th largest score of each row; every column reaching it is a candidate (ties too)
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
    out = np.empty((nq, k), dtype=np.int64)
    for row in range(nq):
        cand = np.flatnonzero(s[row] >= kth[row])
        # lexsort: last key first; -score descending, then column ascending
        out[row] = cand[np.lexsort((cand, -s[row, cand]))[:k]]
    return out

"""Database-side augmentation and α-query expansion, as pure functions of float32 unit rows,
and the ranking helpers the search-time steps share.

- :func:`database_augment`: database-side augmentation (DBA): every gallery vector replaced by
  the weighted mean of itself and its nearest gallery neighbours (:func:`dba_vectors_for`
  gives the vectors of rows added later);
- :func:`alpha_query_expansion`: α-query expansion (αQE, Radenović et al. 2018): the query
  replaced by the weighted mean of itself and its first results, then searched again.

The other steps: test-time augmentation (:mod:`retrieval.postprocess.tta`), whitening
(:mod:`retrieval.postprocess.whitening`) and k-reciprocal re-ranking
(:mod:`retrieval.postprocess.rerank`).

Neighbours are ranked by inner product with exact ties broken by ascending id, as everywhere in
the project. Weights of neighbours are ``max(score, 0) ** alpha``; the vector itself weighs 1.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "alpha_query_expansion",
    "database_augment",
    "dba_vectors_for",
    "normalize_rows",
    "top_k_by_score",
]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def top_k_by_score(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
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


# ---------------------------------------------------------------- DBA and αQE


def _weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    return np.maximum(scores, 0.0).astype(np.float64) ** float(alpha)


def database_augment(
    gallery: np.ndarray, k: int, alpha: float = 3.0, chunk_size: int = 1024
) -> np.ndarray:
    """DBA: each gallery row replaced by ``normalize(x_i + sum_j w_ij x_j)`` over its ``k - 1``
    nearest other rows j (ties by ascending row), ``w_ij = max(x_i . x_j, 0) ** alpha``.

    ``k`` counts the row itself (``k = 1`` changes nothing). Exact: every row is compared
    with every other, ``chunk_size`` rows at a time. Returns (n, d) float32.
    """
    x = np.asarray(gallery, dtype=np.float32)
    out = np.empty_like(x)
    for start in range(0, len(x), chunk_size):
        block = x[start : start + chunk_size]
        scores = block @ x.T
        own = np.arange(start, start + len(block))
        out[start : start + len(block)] = _augment(block, scores, x, k - 1, alpha, exclude=own)
    return out


def dba_vectors_for(new: np.ndarray, base: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """The DBA vectors of rows ``new`` (not yet in the gallery) as :func:`database_augment`
    gives them once they are: their neighbours are taken among ``base`` (the gallery's
    un-augmented rows) and each other, ids of ``new`` after those of ``base``."""
    new = np.asarray(new, dtype=np.float32)
    pool = np.concatenate([np.asarray(base, dtype=np.float32).reshape(-1, new.shape[1]), new])
    own = np.arange(len(pool) - len(new), len(pool))
    return _augment(new, new @ pool.T, pool, k - 1, alpha, exclude=own)


def _augment(
    rows: np.ndarray,
    scores: np.ndarray,
    pool: np.ndarray,
    neighbours: int,
    alpha: float,
    exclude: np.ndarray | None,
) -> np.ndarray:
    if neighbours <= 0:
        return normalize_rows(rows)
    cols = top_k_by_score(scores, neighbours, exclude=exclude)
    w = _weights(np.take_along_axis(scores, cols, axis=1), alpha)
    mixed = rows.astype(np.float64) + np.einsum("qk,qkd->qd", w, pool[cols].astype(np.float64))
    return normalize_rows(mixed)


def alpha_query_expansion(
    queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """αQE: ``normalize(q + sum_j max(s_j, 0) ** alpha * g_j)`` over a query's first results.

    Args:
        queries: (nq, d) unit rows.
        neighbours: (nq, k, d) vectors of each query's first k results (as searched: whitened,
            and augmented when the gallery is).
        scores: (nq, k) their scores; ``-inf`` marks an empty slot (weight 0).

    Returns (nq, d) float32 unit rows.
    """
    s = np.where(np.isfinite(scores), scores, 0.0)
    w = _weights(s, alpha)
    mixed = np.asarray(queries, np.float64) + np.einsum(
        "qk,qkd->qd", w, np.asarray(neighbours, np.float64)
    )
    return normalize_rows(mixed)

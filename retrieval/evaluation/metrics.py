"""Metrics of each query's top-k results, as pure, vectorised functions on numpy arrays.

Common input convention:

- ``neighbor_labels``: (nq, K) integer array; row q holds the gallery labels of query q's
  ranked results, best first. A slot with no result may hold any label that no query has
  (e.g. -1); it then counts as a miss.
- ``query_labels``: (nq,) integer array, the label of each query.
- ``num_relevant``: (nq,) integer array; R_q = number of gallery items with the query's
  label, excluding the query itself in leave-one-out evaluation.

Every function returns a float64 (nq,) array of per-query scores; callers average them.
Queries with no relevant gallery item (R_q == 0) have no defined MAP@R, R-precision or MAP@k
and must be filtered out by the caller: the functions taking ``num_relevant`` raise
ValueError on them. ``nq == 0`` gives an empty result. Full average precision and µAP are
in :mod:`retrieval.evaluation.ap`, NMI in :mod:`retrieval.evaluation.clustering`.
"""

from __future__ import annotations

import numpy as np

from retrieval.infra.checks import positive_int

__all__ = [
    "map_at_k",
    "map_at_r",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
]


def _relevance(neighbor_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Validate the label arrays; return the (nq, K) bool matrix ``rel[q, i] = (hit at i)``."""
    nl = np.asarray(neighbor_labels)
    ql = np.asarray(query_labels)
    if nl.ndim != 2:
        raise ValueError(f"neighbor_labels must be 2-D (nq, K), got shape {nl.shape}")
    if ql.ndim != 1 or ql.shape[0] != nl.shape[0]:
        raise ValueError(f"query_labels must have shape ({nl.shape[0]},), got {ql.shape}")
    for name, arr in (("neighbor_labels", nl), ("query_labels", ql)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    return nl == ql[:, None]


def checked_num_relevant(num_relevant: np.ndarray, nq: int, num_cols: int | None) -> np.ndarray:
    """Validate ``num_relevant`` (and, unless ``num_cols`` is None, R <= K); return int64.
    Also the check of :func:`retrieval.evaluation.ap.average_precision`."""
    r = np.asarray(num_relevant)
    if r.shape != (nq,):
        raise ValueError(f"num_relevant must have shape ({nq},), got {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"num_relevant must be an integer array, got dtype {r.dtype}")
    if nq == 0:
        return r.astype(np.int64)
    if r.min() < 1:
        raise ValueError(
            "num_relevant must be >= 1 for every query; filter out queries with no relevant "
            "gallery item before calling"
        )
    if num_cols is not None and r.max() > num_cols:
        raise ValueError(
            f"neighbor_labels has K={num_cols} columns but max(num_relevant)={r.max()}: "
            "search at least max(num_relevant) neighbours"
        )
    return r.astype(np.int64)


def recall_at_k(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Recall@k as in deep-metric-learning papers (a hit rate, also called CMC@k).

    ``recall@k[q] = 1`` if at least one of the first k results of query q has the query's
    label, else 0. This is not the information-retrieval recall (fraction of the relevant
    items retrieved); recall@1 equals precision@1.

    Args:
        neighbor_labels: (nq, K) integer labels of the ranked results, best first.
        query_labels: (nq,) integer labels.
        k: cut-off, ``1 <= k <= K``. Callers with fewer than k gallery items pass
            ``k = K`` (the whole gallery is then the top k).

    Returns:
        (nq,) float64 array of 0.0 / 1.0.

    Raises:
        ValueError: bad shapes or dtypes, or k outside ``[1, K]``.
    """
    rel = _relevance_at_k(neighbor_labels, query_labels, k)
    return np.asarray(rel.any(axis=1), dtype=np.float64)


def _relevance_at_k(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Validate the labels and ``1 <= k <= K``; return the (nq, k) bool hit matrix."""
    rel = _relevance(neighbor_labels, query_labels)
    positive_int(k, "k", maximum=rel.shape[1])
    return rel[:, :k]


def precision_at_k(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Precision@k: ``(1 / k) * (number of the first k results with the query's label)``.

    Same inputs, ``k`` range (callers clamp k to K) and errors as ``recall_at_k``;
    precision@1 equals recall@1. Returns a (nq,) float64 array in [0, 1].
    """
    rel = _relevance_at_k(neighbor_labels, query_labels, k)
    return rel.sum(axis=1) / np.float64(k)


def map_at_k(
    neighbor_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray, k: int
) -> np.ndarray:
    """MAP@k: average precision over the first k results, normalised by ``min(k, R)``::

        MAP@k[q] = (1 / min(k, R)) * sum_{i=1..k} P(i) * rel(i)

    with P(i) as in ``map_at_r``: a query whose first min(k, R) results are all relevant
    scores 1. Frameworks disagree on this normaliser: pytorch-metric-learning's
    ``mean_average_precision`` with an int ``k`` divides by R (a perfect top k with k < R
    scores k / R there); others divide by the number of hits within k. All agree, and equal
    full average precision, when every relevant item is among the first k. Example: labels
    [1, 0, 1] for a query of label 1 with R = 5 and k = 3 give (1 + 2/3) / 3.

    Inputs, ``k`` range and errors as ``recall_at_k``, plus ``num_relevant``: (nq,) integers
    >= 1 (ValueError otherwise), which may exceed K. Returns a (nq,) float64 array in [0, 1].
    """
    rel = _relevance_at_k(neighbor_labels, query_labels, k)
    r = checked_num_relevant(num_relevant, rel.shape[0], None)
    precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    return (precision * rel).sum(axis=1) / np.minimum(r, k)


def _relevance_at_r(
    neighbor_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return (rel, R): rel is (nq, max R) bool with the hits in the first R_q slots only."""
    rel = _relevance(neighbor_labels, query_labels)
    r = checked_num_relevant(num_relevant, rel.shape[0], rel.shape[1])
    r_max = int(r.max()) if r.size else 0
    rel = rel[:, :r_max] & (np.arange(r_max)[None, :] < r[:, None])
    return rel, r


def map_at_r(
    neighbor_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray
) -> np.ndarray:
    """MAP@R of Musgrave et al. 2020, "A Metric Learning Reality Check".

    With R = R_q and rel(i) = 1 if the i-th result has the query's label::

        MAP@R[q] = (1 / R) * sum_{i=1..R} P(i) * rel(i),   P(i) = (1 / i) * sum_{j<=i} rel(j)

    i.e. average precision truncated at rank R, where a relevant item missing from the top
    R contributes 0. Example: results with labels [1, 0, 1, 0] for a query of label 1 with
    R = 2 give (1/2) * (1/1 + 0) = 0.5 (the hit at rank 3 is past R).

    Args:
        neighbor_labels: (nq, K) integer labels of the ranked results, best first; requires
            ``K >= max(num_relevant)``.
        query_labels: (nq,) integer labels.
        num_relevant: (nq,) integers >= 1.

    Returns:
        (nq,) float64 array in [0, 1].

    Raises:
        ValueError: bad shapes or dtypes, any ``num_relevant < 1``, or ``K < max(R)``.
    """
    rel, r = _relevance_at_r(neighbor_labels, query_labels, num_relevant)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    precision = np.cumsum(rel, axis=1) / ranks
    return (precision * rel).sum(axis=1) / r


def r_precision(
    neighbor_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray
) -> np.ndarray:
    """R-precision: the fraction of the top R = R_q results that have the query's label.

    ``r_precision[q] = (1 / R) * sum_{i=1..R} rel(i)``. Same inputs, requirements and
    errors as ``map_at_r``.

    Returns:
        (nq,) float64 array in [0, 1].
    """
    rel, r = _relevance_at_r(neighbor_labels, query_labels, num_relevant)
    return rel.sum(axis=1) / r

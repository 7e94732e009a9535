"""k-reciprocal re-ranking (Zhong et al. 2017) of a query's first N results, computed on the
query and those N candidates only."""

from __future__ import annotations

import numpy as np

__all__ = ["k_reciprocal_rerank"]


def _reciprocal(rank: np.ndarray, k: int) -> np.ndarray:
    """(m, m) bool: ``[p, g]`` when g is among p's k nearest and p among g's (k-reciprocal),
    from ``rank`` (m, m): each row's points nearest first, the point itself included."""
    m = len(rank)
    near = np.zeros((m, m), dtype=bool)
    near[np.arange(m)[:, None], rank[:, : k + 1]] = True
    return near & near.T


def k_reciprocal_rerank(
    query: np.ndarray,
    candidates: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """Re-rank one query's candidates by k-reciprocal encoding (Zhong et al., CVPR 2017).

    Works on the query and its N candidates only (the candidates are a search's first N
    results), with the distance ``d = 2 - 2 * cosine`` among them:

    1. R*(p): each point's k1-reciprocal neighbours, expanded by the k1/2-reciprocal sets of
       its members that overlap them by more than 2/3;
    2. V(p): weights ``exp(-d(p, g))`` on R*(p), normalised, then averaged over p's k2
       nearest points (local query expansion);
    3. the Jaccard distance ``1 - sum min(V_q, V_g) / sum max(V_q, V_g)``, mixed with the
       original one: ``(1 - lambda) * jaccard + lambda * d``.

    Returns (N,) float32 scores ``1 - final / 2`` (with ``lambda_value = 1`` they are the
    cosines): higher is better. Callers order them with ties by ascending id.
    """
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    c = np.asarray(candidates, dtype=np.float32)
    points = np.concatenate([q, c])
    m = len(points)
    cosine = np.clip(points @ points.T, -1.0, 1.0).astype(np.float64)
    dist = 2.0 - 2.0 * cosine
    np.fill_diagonal(dist, 0.0)
    # nearest first; equal distances by ascending position (the query first, then by rank)
    rank = np.lexsort((np.broadcast_to(np.arange(m), (m, m)), dist), axis=1)
    k1 = max(1, min(int(k1), m - 1))
    half = max(1, int(round(k1 / 2)))
    sets, halves = _reciprocal(rank, k1), _reciprocal(rank, half)
    # g in R(p) brings its k1/2-reciprocal set when that overlaps R(p) by more than 2/3
    overlap = halves.astype(np.float64) @ sets.T.astype(np.float64)  # [g, p] = |H(g) & R(p)|
    brings = sets & (overlap > 2.0 / 3.0 * halves.sum(axis=1)[:, None]).T  # [p, g]
    expanded = sets | (brings.astype(np.float64) @ halves.astype(np.float64) > 0)
    w = np.where(expanded, np.exp(-dist), 0.0)
    v = w / w.sum(axis=1, keepdims=True)
    k2 = max(1, min(int(k2), m))
    if k2 > 1:
        v = v[rank[:, :k2]].mean(axis=1)
    mins = np.minimum(v[0][None, :], v[1:]).sum(axis=1)
    maxs = np.maximum(v[0][None, :], v[1:]).sum(axis=1)
    jaccard = 1.0 - mins / np.maximum(maxs, 1e-12)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[0, 1:]
    return (1.0 - final / 2.0).astype(np.float32)

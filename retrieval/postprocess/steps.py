"""The search-time steps on global descriptors, as pure functions of float32 unit rows.

In the order a search applies them (test-time augmentation, :mod:`retrieval.postprocess.tta`,
comes first, inside the model):

- :func:`fit_whitening` / :class:`Whitening`: PCA-whitening (Jégou & Chum 2012), or learned
  whitening from matching pairs (Radenović et al. 2018), with optional shrinkage of the
  covariance and dimension reduction; applied to queries and gallery alike;
- :func:`database_augment`: database-side augmentation (DBA): every gallery vector replaced by
  the weighted mean of itself and its nearest gallery neighbours;
- :func:`alpha_query_expansion`: α-query expansion (αQE, Radenović et al. 2018): the query
  replaced by the weighted mean of itself and its first results, then searched again;
- :func:`k_reciprocal_rerank`: k-reciprocal re-ranking (Zhong et al. 2017) of a query's first
  N results, computed on the query and those N candidates only.

Neighbours are ranked by inner product with exact ties broken by ascending id, as everywhere in
the project. Weights of neighbours are ``max(score, 0) ** alpha``; the vector itself weighs 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.infra.checks import positive_int

__all__ = [
    "Whitening",
    "alpha_query_expansion",
    "database_augment",
    "dba_vectors_for",
    "fit_whitening",
    "k_reciprocal_rerank",
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


# ---------------------------------------------------------------- whitening


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening: ``x -> normalize((x - mean) @ projection)``.

    ``mean`` is (d,), ``projection`` (d, d_out) float64 (columns ordered by decreasing
    variance, so a prefix of them is the dimension reduction). ``method`` is ``pca`` or
    ``learned``; ``shrinkage`` what the fit used.
    """

    mean: np.ndarray
    projection: np.ndarray
    method: str = "pca"
    shrinkage: float = 0.0

    @property
    def dim_in(self) -> int:
        return int(self.projection.shape[0])

    @property
    def dim_out(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, dim_in) rows -> (n, dim_out) float32 unit rows."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"whitening takes (n, {self.dim_in}) vectors, got {x.shape}")
        weight, bias = self.as_linear()  # the exported model's layer computes the same
        return normalize_rows(np.asarray(x, dtype=np.float32) @ weight.T + bias)

    def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight, bias)`` float32 of the same map as a linear layer ``x @ weight.T + bias``
        (before the normalisation): weight (dim_out, dim_in), bias (dim_out,)."""
        weight = self.projection.T
        return weight.astype(np.float32), (-self.mean @ self.projection).astype(np.float32)


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(1 - s) C + s * (trace(C) / d) I``: pulls small eigenvalues up, so whitening does not
    blow up directions of (near) zero variance."""
    d = cov.shape[0]
    return (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)


def _inverse_sqrt(cov: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors (columns, by decreasing eigenvalue) and ``1 / sqrt(eigenvalue + eps)``."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2.0)
    order = np.argsort(-values, kind="stable")
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    # a fixed sign per eigenvector (largest component positive): fits are reproducible
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    scale = values.max() if values.size and values.max() > 0 else 1.0
    return vectors, 1.0 / np.sqrt(values + eps * scale)


def fit_whitening(
    x: np.ndarray,
    dim: int | None = None,
    shrinkage: float = 0.0,
    labels: np.ndarray | None = None,
    method: str = "pca",
    eps: float = 1e-6,
) -> Whitening:
    """Fit a whitening on the (n, d) vectors ``x``.

    Args:
        dim: keep this many output dimensions (the directions of largest variance);
            ``None`` keeps ``d``.
        shrinkage: in [0, 1]: the covariance is shrunk towards its mean eigenvalue
            (``(1 - s) C + s tr(C)/d I``); 0 is plain whitening, 1 a rotation and a centring.
        labels: (n,) labels, needed by ``method="learned"``.
        method: ``pca``: centre, then scale the principal directions to unit variance.
            ``learned``: with the labels' matching pairs, first whiten the scatter of the
            differences within labels, then rotate onto the principal directions of the data
            (Radenović et al., "Fine-tuning CNN image retrieval with no human annotation").
        eps: added to each eigenvalue, relative to the largest.

    Raises:
        ValueError: fewer than 2 vectors, bad dim, shrinkage or method, non-finite values,
            or ``learned`` without labels that give a matching pair.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"whitening needs at least 2 vectors (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("whitening vectors contain NaN or infinite values")
    d = x.shape[1]
    out = d if dim is None else dim
    positive_int(out, "postprocess.whiten.dim (or null)", maximum=d)
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"postprocess.whiten.shrinkage must be in [0, 1], got {shrinkage!r}")
    mean = x.mean(axis=0)
    centred = x - mean
    if method == "pca":
        cov = _shrunk(centred.T @ centred / len(x), float(shrinkage))
        vectors, inv = _inverse_sqrt(cov, eps)
        projection = vectors * inv[None, :]
    elif method == "learned":
        if labels is None or len(labels) != len(x):
            raise ValueError("postprocess.whiten.method=learned needs one label per vector")
        diffs = _pair_differences(x, np.asarray(labels))
        scatter = _shrunk(diffs.T @ diffs / len(diffs), float(shrinkage))
        vectors, inv = _inverse_sqrt(scatter, eps)
        first = vectors * inv[None, :]  # whitens the within-label scatter
        projected = centred @ first
        rotation, _ = _inverse_sqrt(projected.T @ projected / len(x), eps)
        projection = first @ rotation
    else:
        raise ValueError(f"postprocess.whiten.method must be 'pca' or 'learned', got {method!r}")
    return Whitening(mean, projection[:, : int(out)], method, float(shrinkage))


def _pair_differences(x: np.ndarray, labels: np.ndarray, max_pairs: int = 200_000) -> np.ndarray:
    """``x_i - x_j`` of the pairs with equal labels (i < j), at most ``max_pairs`` of them,
    taken label by label (a seeded sample when there are more)."""
    _, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    first, second = [], []
    for group in np.split(order, bounds):
        if len(group) > 1:
            i, j = np.triu_indices(len(group), k=1)
            first.append(group[i])
            second.append(group[j])
    if not first:
        raise ValueError("postprocess.whiten.method=learned needs labels with 2 or more vectors")
    a, b = np.concatenate(first), np.concatenate(second)
    if len(a) > max_pairs:
        pick = np.random.default_rng(0).choice(len(a), max_pairs, replace=False)
        a, b = a[pick], b[pick]
    return x[a] - x[b]


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


# ---------------------------------------------------------------- k-reciprocal re-ranking


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

"""Query-time steps around any search: α-query expansion, then k-reciprocal re-ranking, then
score normalisation.

:func:`search_with_steps` needs two functions of the caller's search backend, so evaluation
(an in-memory index over the evaluated gallery) and
:class:`~retrieval.search.retriever.Retriever` (a bundle's index and item store)
run the very same steps:

- ``search(x, k) -> (scores, ids)``: the ``k`` best ids of each row of ``x``, best first,
  ``-1`` (score ``-inf``) for an empty slot;
- ``vectors(ids) -> (len(ids), d)``: the searched vectors of those ids (whitened, and
  augmented when the gallery is).

k-reciprocal re-ranking (Zhong et al. 2017) re-orders a query's first N results, computed on
the query and those N candidates only (:func:`k_reciprocal_rerank`).

Score normalisation (SSCD, Pizzi et al. 2022): a query's scores minus ``beta`` times its
similarity to its ``k``-th nearest neighbour in a background set of images that are not
copies of anything searched (a training split). A query in a dense region of the embedding
space (a sky, a document, an emoji) is close to many unrelated images, so its raw scores run
high; subtracting how close it is to unrelated background images makes a score mean the same
thing for every query. The ranking of one query's results does not change (one number is
subtracted from all of them), but scores become comparable across queries: what µAP (one
global ranking of all query-result pairs) and a single duplicate threshold need.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from retrieval.infra.ties import by_score_then_id
from retrieval.postprocess.config import AQE, Rerank, ScoreNorm
from retrieval.postprocess.steps import alpha_query_expansion

__all__ = [
    "SearchFn",
    "VectorsFn",
    "background_similarity",
    "expand_queries",
    "k_reciprocal_rerank",
    "normalize_scores",
    "rerank_results",
    "sample_background",
    "search_with_steps",
]


SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


VectorsFn = Callable[[np.ndarray], np.ndarray]


def _gather(vectors: VectorsFn, ids: np.ndarray, dim: int) -> np.ndarray:
    """(nq, k, dim) vectors of ``ids`` (nq, k); zeros where the id is -1."""
    flat = ids.reshape(-1)
    out = np.zeros((flat.size, dim), dtype=np.float32)
    valid = flat >= 0
    if valid.any():
        out[valid] = vectors(flat[valid])
    return out.reshape(*ids.shape, dim)


def expand_queries(
    queries: np.ndarray, search: SearchFn, vectors: VectorsFn, aqe: AQE
) -> np.ndarray:
    """αQE: the queries mixed with their first ``aqe.k`` results (see
    :func:`~retrieval.postprocess.steps.alpha_query_expansion`)."""
    scores, ids = search(queries, aqe.k)
    scores = np.where(ids >= 0, scores, -np.inf)
    found = _gather(vectors, ids, queries.shape[1])
    return alpha_query_expansion(queries, found, scores, aqe.alpha)


def rerank_results(
    queries: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    vectors: VectorsFn,
    rerank: Rerank,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's results re-ordered by k-reciprocal re-ranking scores, equal scores by
    ascending id; empty slots (-1) stay last. Returns new ``(scores, ids)`` of the same shape."""
    out_scores = np.full(scores.shape, -np.inf, dtype=np.float32)
    out_ids = np.full(ids.shape, -1, dtype=np.int64)
    found = _gather(vectors, ids, queries.shape[1])
    for row in range(len(ids)):
        valid = np.flatnonzero(ids[row] >= 0)
        if valid.size == 0:
            continue
        row_ids = ids[row, valid]
        new = k_reciprocal_rerank(
            queries[row], found[row, valid], rerank.k1, rerank.k2, rerank.lambda_value
        )
        out_scores[row, : valid.size], out_ids[row, : valid.size] = by_score_then_id(new, row_ids)
    return out_scores, out_ids


def search_with_steps(
    queries: np.ndarray,
    k: int,
    search: SearchFn,
    vectors: VectorsFn,
    aqe: AQE | None = None,
    rerank: Rerank | None = None,
    score_norm: ScoreNorm | None = None,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search ``k`` results per query with αQE, re-ranking and score normalisation when given.

    With re-ranking, the first ``max(k, rerank.top_n)`` results are re-ordered and the first
    ``k`` of them returned, scored by the re-ranking (see
    :func:`~retrieval.postprocess.query.k_reciprocal_rerank`). With ``score_norm`` each
    query's scores then drop by its similarity to the ``background`` vectors (searched space,
    (nb, d)) as :func:`~retrieval.postprocess.query.normalize_scores` says; the order of
    its results stays.

    Raises:
        ValueError: ``score_norm`` without a ``background``.

    Returns ``(scores, ids, final_queries)``: (nq, <=k) each, and the query vectors as last
    searched (expanded by αQE, or as given).
    """
    x = np.ascontiguousarray(queries, dtype=np.float32)
    if aqe is not None:
        x = expand_queries(x, search, vectors, aqe)
    want = k if rerank is None else max(k, rerank.top_n)
    scores, ids = search(x, want)
    if rerank is not None:
        scores, ids = rerank_results(x, scores, ids, vectors, rerank)
    scores, ids = scores[:, :k], ids[:, :k]
    if score_norm is not None:
        if background is None:
            raise ValueError("postprocess.score_norm needs its background vectors")
        scores = normalize_scores(scores, x, background, score_norm)
    return scores, ids, x


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


_CHUNK = 1024  # queries per product with the background: (1024, n) float32 at a time


def background_similarity(queries: np.ndarray, background: np.ndarray, k: int) -> np.ndarray:
    """``(nq,)`` float32: each query's ``k``-th largest inner product with the ``background``
    rows ``(nb, d)`` (the smallest of them all when ``k > nb``).

    Raises:
        ValueError: an empty background, or dimensions that differ.
    """
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    xb = np.ascontiguousarray(background, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] == 0:
        raise ValueError(f"the score-normalisation background is empty ({xb.shape})")
    if xq.ndim != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError(
            f"queries of shape {xq.shape} cannot be compared with a background of dim {xb.shape[1]}"
        )
    kk = min(int(k), xb.shape[0])
    out = np.empty(len(xq), dtype=np.float32)
    for start in range(0, len(xq), _CHUNK):
        sims = xq[start : start + _CHUNK] @ xb.T
        # the kk-th largest: position nb - kk of an ascending partition
        out[start : start + len(sims)] = np.partition(sims, xb.shape[0] - kk, axis=1)[
            :, xb.shape[0] - kk
        ]
    return out


def normalize_scores(
    scores: np.ndarray, queries: np.ndarray, background: np.ndarray, norm: ScoreNorm
) -> np.ndarray:
    """``scores`` (nq, k) of ``queries`` (nq, d) minus ``norm.beta`` times each query's
    :func:`background_similarity`; empty slots (``-inf``) stay ``-inf``. float32."""
    bias = norm.beta * background_similarity(queries, background, norm.k)
    s = np.asarray(scores, dtype=np.float32)
    return np.where(np.isneginf(s), s, s - bias[:, None]).astype(np.float32)


def sample_background(vectors: np.ndarray, norm: ScoreNorm, seed: int = 0) -> np.ndarray:
    """At most ``norm.background`` rows of ``vectors`` (a seeded sample, in their order):
    what a bundle stores and every query is compared with."""
    x = np.asarray(vectors, dtype=np.float32)
    if len(x) <= norm.background:
        return np.ascontiguousarray(x)
    chosen = np.sort(np.random.default_rng(seed).choice(len(x), norm.background, replace=False))
    return np.ascontiguousarray(x[chosen])

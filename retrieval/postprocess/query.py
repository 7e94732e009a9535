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
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from retrieval.postprocess.config import AQE, Rerank, ScoreNorm
from retrieval.postprocess.rerank import k_reciprocal_rerank
from retrieval.postprocess.score_norm import normalize_scores
from retrieval.postprocess.steps import alpha_query_expansion

__all__ = ["SearchFn", "VectorsFn", "expand_queries", "rerank_results", "search_with_steps"]

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
        order = np.lexsort((row_ids, -new))
        out_scores[row, : valid.size] = new[order]
        out_ids[row, : valid.size] = row_ids[order]
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
    :func:`~retrieval.postprocess.rerank.k_reciprocal_rerank`). With ``score_norm`` each
    query's scores then drop by its similarity to the ``background`` vectors (searched space,
    (nb, d)) as :func:`~retrieval.postprocess.score_norm.normalize_scores` says; the order of
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

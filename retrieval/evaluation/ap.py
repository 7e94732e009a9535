"""Average precision beyond one query's top k: full AP over a query's whole ranking, and µAP
of the results of all queries pooled into one ranking.

``average_precision`` takes the positions of each query's relevant items in its full ranking
(``retrieval.evaluation.ranking.relevant_ranks``) and ``num_relevant`` as in
:mod:`retrieval.evaluation.metrics`: queries with R_q == 0 must be filtered out by the
caller. ``micro_average_precision`` takes the scores of the top-k results of every query,
queries without a relevant gallery item included.
"""

from __future__ import annotations

import numpy as np

from retrieval.evaluation.metrics import checked_num_relevant
from retrieval.infra.checks import is_int

__all__ = ["average_precision", "micro_average_precision"]


def average_precision(relevant_ranks: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """Full average precision from the positions of the relevant items in the whole ranking.

    ``AP[q] = (1 / R) * sum_{j=1..R} j / rank_j`` where rank_1 < ... < rank_R are the 1-based
    positions of query q's R = R_q relevant gallery items in its full ranking (as returned
    by ``retrieval.evaluation.ranking.relevant_ranks``). Example: ranks [1, 3] give (1/1 + 2/3) / 2.

    Args:
        relevant_ranks: (nq, Rmax) integers, Rmax >= max(R): row q holds its R_q ranks
            ascending in columns 0..R_q-1, then zeros.
        num_relevant: (nq,) integers >= 1.

    Returns:
        (nq,) float64 array in (0, 1].

    Raises:
        ValueError: bad shapes or dtypes, ``num_relevant < 1``, ranks not strictly
            increasing, a rank_j < j, or non-zero padding.
    """
    ranks = np.asarray(relevant_ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(
            f"relevant_ranks must be a 2-D integer array, got {ranks.dtype} {ranks.shape}"
        )
    r = checked_num_relevant(num_relevant, ranks.shape[0], ranks.shape[1])
    ranks = ranks.astype(np.int64)
    j = np.arange(1, ranks.shape[1] + 1, dtype=np.int64)
    valid = j[None, :] <= r[:, None]
    if np.any(ranks[~valid] != 0):
        raise ValueError("relevant_ranks must be 0 after column num_relevant[q] of each row")
    steps = np.diff(ranks, axis=1, prepend=0)
    if np.any(valid & ((ranks < j) | (steps < 1))):
        raise ValueError(
            "relevant_ranks must hold strictly increasing ranks with rank_j >= j in each row"
        )
    return np.where(valid, j / np.maximum(ranks, 1), 0.0).sum(axis=1) / r


def micro_average_precision(scores: np.ndarray, relevant: np.ndarray, num_positives: int) -> float:
    """Micro average precision (µAP), the metric of the DISC2021 copy-detection descriptor track.

    Every (query, result) pair of the top-k lists is one prediction with its score. All pairs
    of all queries are sorted together by score, descending; equal scores keep the order of
    the pairs in the input, row by row (query index ascending, then rank ascending), so the
    result never depends on a sort's stability. With ``rel(j)`` = 1 for a relevant pair at
    position j of that global ranking and ``P(j)`` the share of relevant pairs among the
    first j::

        µAP = (1 / num_positives) * sum_j P(j) * rel(j)

    the area under the precision-recall curve of the pooled predictions. Unlike the per-query
    averages, a confident wrong result of one query lowers the precision of every other
    query's correct results ranked after it, so the scores must be comparable across queries
    (cosine similarities are). Relevant pairs not among the k results are recall lost: they
    count in ``num_positives`` but never appear. Example: scores [[0.9, 0.5], [0.7, 0.6]]
    with relevant [[False, True], [True, False]] and 2 positives rank the pairs 0.9 (miss),
    0.7 (hit, P = 1/2), 0.6 (miss), 0.5 (hit, P = 2/4): µAP = (1/2 + 1/2) / 2 = 0.5.

    Args:
        scores: (nq, k) float similarities, higher is better; no NaN (-inf is allowed, e.g.
            for an empty result slot, which must then not be relevant). A row of a query
            without any relevant gallery item holds only false positives.
        relevant: (nq, k) bool: whether the result is relevant to its query.
        num_positives: the number of relevant (query, gallery item) pairs there are, found or
            not: ``sum_q R_q``. With one source image per copy (DISC2021) it is the number of
            queries whose source is in the gallery.

    Returns:
        µAP in [0, 1]; 0.0 when no relevant pair was found (or ``nq * k == 0``).

    Raises:
        ValueError: shapes that are not (nq, k) alike, non-float scores, NaN scores, a
            non-bool ``relevant``, ``num_positives < 1`` or fewer than the relevant pairs
            given.
    """
    s, rel = np.asarray(scores), np.asarray(relevant)
    if s.ndim != 2 or rel.shape != s.shape:
        raise ValueError(
            f"scores and relevant must be 2-D of one shape (nq, k), got {s.shape}, {rel.shape}"
        )
    if not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"scores must be a float array, got dtype {s.dtype}")
    if rel.dtype != np.bool_:
        raise ValueError(f"relevant must be a bool array, got dtype {rel.dtype}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    found = int(rel.sum())
    if not is_int(num_positives):
        raise ValueError(f"num_positives must be an int, got {num_positives!r}")
    if num_positives < max(1, found):
        raise ValueError(
            f"num_positives={num_positives} must be >= 1 and >= the {found} relevant pairs given"
        )
    order = np.argsort(-s.ravel().astype(np.float64), kind="stable")
    hits = rel.ravel()[order]
    positions = np.flatnonzero(hits) + 1  # 1-based ranks of the relevant pairs
    precision = np.arange(1, positions.size + 1) / positions
    return float(precision.sum() / num_positives)

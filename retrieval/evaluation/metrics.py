"""The metrics, as pure, vectorised functions on numpy arrays: those of each query's top-k
results, average precision beyond them, µAP, and NMI of clusters.

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
ValueError on them. ``nq == 0`` gives an empty result.

Beyond one query's top k: ``average_precision`` is the full AP over a query's whole ranking;
it takes the positions of each query's relevant items in that ranking
(``retrieval.evaluation.ranking.relevant_ranks``) and ``num_relevant`` as above.
``micro_average_precision`` is the µAP of the results of all queries pooled into one
ranking; it takes the scores of the top-k results of every query, queries without a relevant
gallery item included.

``per_query_metrics`` and ``micro_ap_at_k`` compute an evaluation search's metrics from its
results; ``reranked_ranks`` gives the full-ranking positions of the relevant items after
re-ranking; ``nmi`` the normalised mutual information of cluster assignments with labels.
"""

from __future__ import annotations

import numpy as np

from retrieval.infra.checks import is_int, positive_int

__all__ = [
    "average_precision",
    "map_at_k",
    "map_at_r",
    "micro_ap_at_k",
    "micro_average_precision",
    "nmi",
    "per_query_metrics",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
    "reranked_ranks",
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
    Also the check of :func:`retrieval.evaluation.metrics.average_precision`."""
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


def per_query_metrics(
    ids: np.ndarray,
    gallery_codes: np.ndarray,
    query_codes: np.ndarray,
    num_relevant: np.ndarray,
    ks: list[int],
    metrics: list[str],
) -> dict[str, np.ndarray]:
    """Per-query values of every ranking metric from the (nq, K) ids of the results."""
    labels = np.where(ids >= 0, gallery_codes[np.clip(ids, 0, None)], -1)
    cols = labels.shape[1]
    out: dict[str, np.ndarray] = {}
    # a k past the gallery takes the whole gallery
    if "recall" in metrics:
        out.update({f"recall@{k}": recall_at_k(labels, query_codes, min(k, cols)) for k in ks})
    if "precision" in metrics:
        out.update(
            {f"precision@{k}": precision_at_k(labels, query_codes, min(k, cols)) for k in ks}
        )
    if "map@k" in metrics:
        out.update(
            {f"map@{k}": map_at_k(labels, query_codes, num_relevant, min(k, cols)) for k in ks}
        )
    if "map@r" in metrics:
        out["map@r"] = map_at_r(labels, query_codes, num_relevant)
    if "r_precision" in metrics:
        out["r_precision"] = r_precision(labels, query_codes, num_relevant)
    return out


def micro_ap_at_k(
    scores: np.ndarray,
    ids: np.ndarray,
    gallery_codes: np.ndarray,
    query_codes: np.ndarray,
    num_positives: int,
    ks: list[int],
    lone_scores: np.ndarray | None,
) -> dict[str, float]:
    """``micro_ap@{k}``: µAP of the first k results of every query pooled together, the
    results of queries without a relevant item (``lone_scores``, all misses) included."""
    labels = np.where(ids >= 0, gallery_codes[np.clip(ids, 0, None)], -1)
    relevant = labels == query_codes[:, None]
    scores = np.where(ids >= 0, scores, -np.inf)  # an empty slot is no prediction
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        s, rel = scores[:, :kk], relevant[:, :kk]
        if lone_scores is not None:
            s = np.concatenate([s, lone_scores[:, :kk]])
            rel = np.concatenate([rel, np.zeros((len(lone_scores), kk), bool)])
        out[f"micro_ap@{k}"] = micro_average_precision(s, rel, num_positives)
    return out


def reranked_ranks(
    ranks: np.ndarray,
    ids: np.ndarray,
    gallery_codes: np.ndarray,
    query_codes: np.ndarray,
    num_relevant: np.ndarray,
) -> np.ndarray:
    """Full-ranking positions of the relevant items after re-ranking the first ``ids.shape[1]``
    results: their new positions inside that block, the plain ones after it."""
    block = ids.shape[1]
    out = np.zeros_like(ranks)
    relevant = (ids >= 0) & (gallery_codes[np.clip(ids, 0, None)] == query_codes[:, None])
    for row in range(len(ranks)):
        inside = np.flatnonzero(relevant[row]) + 1
        r = int(num_relevant[row])
        tail = np.sort(ranks[row, :r])[inside.size :]
        tail = np.maximum(tail, block + 1 + np.arange(tail.size))
        out[row, :r] = np.concatenate([inside, tail])
    return out


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()  # counts > 0
    return float(-(p * np.log(p)).sum())


def nmi(cluster_ids: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information of a clustering with the labels, in nats.

    ``NMI = MI(C, L) / ((H(C) + H(L)) / 2)``: arithmetic-mean normalisation, the default of
    scikit-learn's ``normalized_mutual_info_score`` (which pytorch-metric-learning's "NMI"
    calls), with its conventions for degenerate inputs: 1.0 when both partitions have a
    single group (or there are no samples), 0.0 when only one of them has a single group or
    when MI is 0. Symmetric in its two arguments; ids are only compared for equality.

    Args: ``cluster_ids`` and ``labels``, (n,) integer arrays. Returns a float in [0, 1].
    Raises ValueError unless both are 1-D integer arrays of the same length.
    """
    c, lab = np.asarray(cluster_ids), np.asarray(labels)
    if c.ndim != 1 or c.shape != lab.shape:
        raise ValueError(f"cluster_ids, labels must be 1-D of one length: {c.shape}, {lab.shape}")
    for name, arr in (("cluster_ids", c), ("labels", lab)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    _, ci, c_counts = np.unique(c, return_inverse=True, return_counts=True)
    _, li, l_counts = np.unique(lab, return_inverse=True, return_counts=True)
    if c_counts.size == l_counts.size <= 1:
        return 1.0
    if c_counts.size == 1 or l_counts.size == 1:
        return 0.0
    pairs = ci.astype(np.int64) * l_counts.size + li
    pair_ids, joint = np.unique(pairs, return_counts=True)
    n = float(c.size)
    outer = c_counts[pair_ids // l_counts.size] * l_counts[pair_ids % l_counts.size]
    mi = float(np.clip((joint / n * np.log(joint * n / outer)).sum(), 0.0, None))
    if mi <= 0.0:
        return 0.0
    return min(1.0, mi / ((_entropy(c_counts) + _entropy(l_counts)) / 2))

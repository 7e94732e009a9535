"""The metrics of one evaluation search: per-query ranking metrics of the results, µAP of
them pooled, and the full-ranking positions of the relevant items after re-ranking."""

from __future__ import annotations

import numpy as np

from retrieval.evaluation.ap import micro_average_precision
from retrieval.evaluation.metrics import (
    map_at_k,
    map_at_r,
    precision_at_k,
    r_precision,
    recall_at_k,
)

__all__ = ["micro_ap_at_k", "per_query_metrics", "reranked_ranks"]


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

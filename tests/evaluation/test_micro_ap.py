"""µAP: the pure function against a naive loop and hand-worked cases, and the ``micro_ap``
metric family of evaluate_embeddings against a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from retrieval.evaluation import ALL_METRICS, evaluate_embeddings
from retrieval.evaluation.metrics import micro_average_precision


def naive_micro_ap(scores: np.ndarray, relevant: np.ndarray, num_positives: int) -> float:
    """Straight from the definition: every pair, sorted by (-score, query, rank)."""
    pairs = [
        (-float(scores[q, i]), q, i, bool(relevant[q, i]))
        for q in range(scores.shape[0])
        for i in range(scores.shape[1])
    ]
    total, hits = 0.0, 0
    for position, (_, _, _, hit) in enumerate(sorted(pairs), start=1):
        if hit:
            hits += 1
            total += hits / position
    return total / num_positives


def test_hand_worked_example():
    scores = np.array([[0.9, 0.5], [0.7, 0.6]])
    relevant = np.array([[False, True], [True, False]])
    # global order 0.9 miss, 0.7 hit (1/2), 0.6 miss, 0.5 hit (2/4)
    assert micro_average_precision(scores, relevant, 2) == pytest.approx(0.5)
    # a third positive never retrieved is recall lost
    assert micro_average_precision(scores, relevant, 3) == pytest.approx(1 / 3)
    # one query's confident miss lowers the other's hit: per-query AP would give 1/2 and 1
    scores = np.array([[0.95, 0.1], [0.9, 0.2]])
    relevant = np.array([[False, False], [True, False]])
    assert micro_average_precision(scores, relevant, 1) == pytest.approx(1 / 2)


def test_ties_follow_query_then_rank_order():
    relevant = np.array([[False], [True]])
    scores = np.array([[0.5], [0.5]])
    assert micro_average_precision(scores, relevant, 1) == pytest.approx(1 / 2)
    assert micro_average_precision(scores, relevant[::-1].copy(), 1) == pytest.approx(1.0)
    # within a row, the earlier rank comes first
    assert micro_average_precision(np.array([[0.5, 0.5]]), np.array([[False, True]]), 1) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_naive_loop_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(seed)
    nq, k = 40, 7
    # coarse scores: many ties within and across queries; some rows exact duplicates
    scores = np.sort(rng.integers(0, 6, (nq, k)) / 5.0, axis=1)[:, ::-1].copy()
    scores[5] = scores[4]
    relevant = rng.random((nq, k)) < 0.2
    relevant[5] = relevant[4]
    positives = int(relevant.sum()) + int(rng.integers(0, 10))
    got = micro_average_precision(scores, relevant, positives)
    assert got == pytest.approx(naive_micro_ap(scores, relevant, positives), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_sklearn_average_precision_of_the_pooled_pairs(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((30, 5))  # distinct scores: no tie rule involved
    relevant = rng.random((30, 5)) < 0.3
    found = int(relevant.sum())
    pooled = average_precision_score(relevant.ravel(), scores.ravel())
    assert micro_average_precision(scores, relevant, found) == pytest.approx(pooled)
    # with positives never retrieved, the precision-recall curve stops at found / positives
    assert micro_average_precision(scores, relevant, 2 * found) == pytest.approx(pooled / 2)


def test_invariances():
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((25, 6))
    relevant = rng.random((25, 6)) < 0.25
    positives = int(relevant.sum()) + 3
    base = micro_average_precision(scores, relevant, positives)
    assert 0.0 < base < 1.0
    order = rng.permutation(25)
    assert micro_average_precision(scores[order], relevant[order], positives) == pytest.approx(base)
    # any increasing map of the scores (comparable across queries) keeps the ranking
    assert micro_average_precision(np.exp(3 * scores) + 1, relevant, positives) == pytest.approx(
        base
    )
    # results scored below everything else change nothing; above, they cost precision
    low = np.full((4, 6), scores.min() - 1.0)
    none = np.zeros((4, 6), bool)
    stacked = micro_average_precision(
        np.vstack([scores, low]), np.vstack([relevant, none]), positives
    )
    assert stacked == pytest.approx(base)
    high = np.vstack([scores, low + 100.0])
    assert micro_average_precision(high, np.vstack([relevant, none]), positives) < base
    # every hit first: recall is the only loss
    perfect = np.where(relevant, 10.0, scores)
    assert micro_average_precision(perfect, relevant, positives) == pytest.approx(
        relevant.sum() / positives
    )


def test_corner_cases_and_errors():
    assert micro_average_precision(np.zeros((3, 2)), np.zeros((3, 2), bool), 4) == 0.0
    assert micro_average_precision(np.zeros((0, 2)), np.zeros((0, 2), bool), 1) == 0.0
    empty = np.array([[0.9, -np.inf]])  # a slot without a result
    assert micro_average_precision(empty, np.array([[True, False]]), 1) == 1.0
    good, rel = np.ones((2, 2)), np.eye(2, dtype=bool)
    with pytest.raises(ValueError, match="NaN"):
        micro_average_precision(np.array([[np.nan, 1.0], [0.0, 1.0]]), rel, 2)
    with pytest.raises(ValueError, match="one shape"):
        micro_average_precision(good, rel[:1], 2)
    with pytest.raises(ValueError, match="bool"):
        micro_average_precision(good, rel.astype(int), 2)
    with pytest.raises(ValueError, match="float"):
        micro_average_precision(good.astype(int), rel, 2)
    with pytest.raises(ValueError, match="relevant pairs given"):
        micro_average_precision(good, rel, 1)
    with pytest.raises(ValueError, match="num_positives"):
        micro_average_precision(good, np.zeros((2, 2), bool), 0)


# ------------------------------------------------------------------ through the index


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_force_micro_ap(xq, lq, xg, lg, k, self_search=False):
    """Scores of every gallery item, top k by (-score, id); pairs of every query pooled."""
    sims = xq.astype(np.float64) @ xg.astype(np.float64).T
    if self_search:
        np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(sims, top, axis=1)
    relevant = lg[top] == lq[:, None]
    counts = np.array([(lg == label).sum() for label in lq]) - (1 if self_search else 0)
    return naive_micro_ap(scores, relevant, int(counts.sum()))


def test_micro_ap_family_query_gallery_with_lone_queries():
    rng = np.random.default_rng(0)
    xg = _unit(rng.standard_normal((60, 16)))
    lg = rng.integers(0, 15, 60)
    source = rng.integers(0, 60, 33)  # noisy copies of gallery items
    lq = np.concatenate([lg[source[:30]], np.array([99, 98, 97])])  # 3 lone queries
    xq = _unit(xg[source] + 0.8 * rng.standard_normal((33, 16)))
    result = evaluate_embeddings(xq, lq, xg, lg, ks=[1, 5], metrics=["recall", "micro_ap"])
    assert result.num_excluded == 3
    for k in (1, 5):
        want = _brute_force_micro_ap(xq, lq, xg, lg, k)
        assert result.metrics[f"micro_ap@{k}"] == pytest.approx(want, rel=1e-6)
    # the lone queries' hits are false positives: dropping them raises µAP
    kept = evaluate_embeddings(xq[:30], lq[:30], xg, lg, ks=[5], metrics=["micro_ap"])
    assert kept.metrics["micro_ap@5"] > result.metrics["micro_ap@5"]
    assert "micro_ap@5" not in result.per_query


def test_micro_ap_family_leave_one_out_and_approximate_index():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 8))
    labels = np.repeat(np.arange(20), 4)
    labels[-1] = 50  # a singleton: no relevant item
    x = _unit(centres[np.repeat(np.arange(20), 4)] + 0.7 * rng.standard_normal((80, 8)))
    result = evaluate_embeddings(x, labels, ks=[3], metrics=["micro_ap"])
    want = _brute_force_micro_ap(x, labels, x, labels, 3, self_search=True)
    assert result.metrics["micro_ap@3"] == pytest.approx(want, rel=1e-6)
    approx = evaluate_embeddings(x, labels, ks=[3], metrics=["micro_ap"], factory="HNSW8")
    assert approx.exact_metrics is not None
    assert approx.exact_metrics["micro_ap@3"] == pytest.approx(want, rel=1e-6)


def test_micro_ap_is_a_known_metric_family():
    assert "micro_ap" in ALL_METRICS
    x = _unit(np.random.default_rng(2).standard_normal((10, 4)))
    with pytest.raises(ValueError, match="micro_ap"):
        evaluate_embeddings(x, np.arange(10) % 2, metrics=["microap"])

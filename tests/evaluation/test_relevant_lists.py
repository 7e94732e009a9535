"""GLDv2 retrieval mAP@100 against a naive loop, and DISC2021 µAP on the converted layout
against the naive µAP loop of tests/evaluation/test_micro_ap.py, queries without a match
included."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation import evaluate_embeddings
from retrieval.evaluation.listed import evaluate_relevant_lists
from tests.evaluation.test_micro_ap import naive_micro_ap


def naive_map_at_k(ranking, relevant, k):
    """mAP@k of one query as the GLDv2 paper writes it: sum over the first k results of
    precision at each relevant one, divided by min(number relevant, k)."""
    hits, total = 0, 0.0
    for position, item in enumerate(ranking[:k], start=1):
        if item in relevant:
            hits += 1
            total += hits / position
    return total / min(len(relevant), k)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_map_at_100_equals_the_naive_loop(seed):
    rng = np.random.default_rng(seed)
    xq, xg = _unit(rng, 15, 8), _unit(rng, 300, 8)
    # relevant lists of 0 to 150 items: some longer than 100 (divided by 100), some empty
    relevant = [rng.choice(300, size=int(rng.integers(0, 150)), replace=False) for _ in range(15)]
    relevant[2] = np.array([], dtype=np.int64)
    result = evaluate_relevant_lists(xq, xg, relevant, ks=(10, 100))
    scores = xq.astype(np.float64) @ xg.T.astype(np.float64)
    rankings = [np.lexsort((np.arange(300), -row)) for row in scores]
    kept = [q for q in range(15) if len(relevant[q])]
    for k in (10, 100):
        expected = [naive_map_at_k(list(rankings[q]), set(relevant[q].tolist()), k) for q in kept]
        assert result.metrics[f"map@{k}"] == pytest.approx(float(np.mean(expected)), abs=1e-9)
    assert result.num_queries == len(kept) and result.num_excluded == 15 - len(kept)


def test_hand_computed_map_at_100():
    # one query, gallery of 3 along a line: ranked 0, 1, 2; relevant {1, 2}
    xq = np.array([[1.0, 0.0]], dtype=np.float32)
    xg = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    result = evaluate_relevant_lists(xq, xg, [[1, 2]])
    assert result.metrics["map@100"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="no query has a relevant"):
        evaluate_relevant_lists(xq, xg, [[]])


def test_disc21_micro_ap_counts_queries_without_a_match():
    # references 0..9; queries 0..5 copy references 0..5; queries 6..9 have no match
    rng = np.random.default_rng(7)
    refs = _unit(rng, 10, 16)
    matched = refs[:6] + 0.3 * _unit(rng, 6, 16)
    lone = _unit(rng, 4, 16)
    xq = np.concatenate([matched, lone])
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    q_labels = [f"R{i}" for i in range(6)] + [f"Q{i}" for i in range(6, 10)]
    g_labels = [f"R{i}" for i in range(10)]
    result = evaluate_embeddings(xq, q_labels, refs, g_labels, ks=[1, 5], metrics=["micro_ap"])
    assert result.num_excluded == 4
    scores = xq.astype(np.float64) @ refs.T.astype(np.float64)
    for k in (1, 5):
        top = np.stack([np.lexsort((np.arange(10), -row))[:k] for row in scores])
        top_scores = np.take_along_axis(scores, top, axis=1)
        relevant = np.array([[g_labels[j] == q_labels[q] for j in top[q]] for q in range(10)])
        expected = naive_micro_ap(top_scores, relevant, 6)
        assert result.metrics[f"micro_ap@{k}"] == pytest.approx(expected, abs=1e-6)

"""Tests of retrieval.metrics against hand-worked examples and a naive per-query oracle."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.metrics import map_at_r, r_precision, recall_at_k


def _naive(neighbor_labels, query_labels, num_relevant, k):
    """Per-query loops written straight from the definitions."""
    recall, ap, rp = [], [], []
    for row, label, r in zip(
        neighbor_labels.tolist(), query_labels.tolist(), num_relevant, strict=True
    ):
        recall.append(1.0 if label in row[:k] else 0.0)
        hits, total = 0, 0.0
        for i, lab in enumerate(row[:r], start=1):
            if lab == label:
                hits += 1
                total += hits / i
        ap.append(total / r)
        rp.append(hits / r)
    return np.array(recall), np.array(ap), np.array(rp)


def test_hand_worked_examples():
    nl = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [2, 2, 2, 0]])
    ql = np.array([1, 1, 2])
    r = np.array([2, 3, 3])
    # query 0: hits at ranks 1, 3; R=2 -> (1/2)(1/1) ; a hit at rank 3 is past R
    # query 1: hits at ranks 2, 3; R=3 -> (1/3)(1/2 + 2/3)
    # query 2: hits at ranks 1, 2, 3; R=3 -> 1
    np.testing.assert_allclose(map_at_r(nl, ql, r), [0.5, (1 / 2 + 2 / 3) / 3, 1.0])
    np.testing.assert_allclose(r_precision(nl, ql, r), [0.5, 2 / 3, 1.0])
    np.testing.assert_array_equal(recall_at_k(nl, ql, 1), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(recall_at_k(nl, ql, 2), [1.0, 1.0, 1.0])
    # [1, 0, 1, 0]: R = 2 stops before the hit at rank 3; R = 3 includes it, P(3) = 2/3
    nl2 = np.array([[1, 0, 1, 0]])
    np.testing.assert_allclose(map_at_r(nl2, np.array([1]), np.array([2])), [1 / 2])
    np.testing.assert_allclose(map_at_r(nl2, np.array([1]), np.array([3])), [(1 + 2 / 3) / 3])


def test_missing_results_count_as_misses():
    nl = np.array([[-1, 3, -1]])
    np.testing.assert_allclose(map_at_r(nl, np.array([3]), np.array([2])), [0.25])
    np.testing.assert_array_equal(recall_at_k(nl, np.array([3]), 1), [0.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    nq, big_k = 200, 12
    ql = rng.integers(0, 4, size=nq)
    nl = rng.integers(0, 4, size=(nq, big_k))
    r = rng.integers(1, big_k + 1, size=nq)
    for k in (1, 2, 4, 8, big_k):
        rec, ap, rp = _naive(nl, ql, r, k)
        out = recall_at_k(nl, ql, k)
        assert out.dtype == np.float64 and out.shape == (nq,)
        np.testing.assert_array_equal(out, rec)
    np.testing.assert_allclose(map_at_r(nl, ql, r), ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r_precision(nl, ql, r), rp, rtol=0, atol=1e-12)
    assert 0 < map_at_r(nl, ql, r).mean() < 1


def test_empty_query_set():
    nl = np.zeros((0, 3), dtype=np.int64)
    ql = np.zeros(0, dtype=np.int64)
    r = np.zeros(0, dtype=np.int64)
    assert map_at_r(nl, ql, r).shape == (0,)
    assert r_precision(nl, ql, r).shape == (0,)
    assert recall_at_k(nl, ql, 1).shape == (0,)


@pytest.mark.parametrize("fn", [map_at_r, r_precision])
def test_r_errors(fn):
    nl = np.array([[1, 0], [0, 1]])
    ql = np.array([1, 1])
    with pytest.raises(ValueError, match="num_relevant must be >= 1"):
        fn(nl, ql, np.array([1, 0]))
    with pytest.raises(ValueError, match="max\\(num_relevant\\)"):
        fn(nl, ql, np.array([1, 3]))
    with pytest.raises(ValueError, match="num_relevant must have shape"):
        fn(nl, ql, np.array([1]))
    with pytest.raises(ValueError, match="integer"):
        fn(nl, ql, np.array([1.0, 1.0]))


def test_shape_and_k_errors():
    nl = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="query_labels"):
        recall_at_k(nl, np.array([1, 1, 1]), 1)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.array([1, 0]), np.array([1, 1]), 1)
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(nl.astype(float), np.array([1, 1]), 1)
    for k in (0, 3, True):
        with pytest.raises(ValueError, match="k must be"):
            recall_at_k(nl, np.array([1, 1]), k)

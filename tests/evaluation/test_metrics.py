"""Tests of the metrics of retrieval.evaluation against hand-worked examples and a naive oracle."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation import (
    average_precision,
    map_at_k,
    map_at_r,
    nmi,
    precision_at_k,
    r_precision,
    recall_at_k,
)


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


# ---- precision@k, MAP@k, full AP, NMI ----------------------------------------------------


def _naive_precision_map_at_k(neighbor_labels, query_labels, num_relevant, k):
    precision, ap = [], []
    for row, label, r in zip(
        neighbor_labels.tolist(), query_labels.tolist(), num_relevant.tolist(), strict=True
    ):
        hits, total = 0, 0.0
        for i, lab in enumerate(row[:k], start=1):
            if lab == label:
                hits += 1
                total += hits / i
        precision.append(hits / k)
        ap.append(total / min(k, r))
    return np.array(precision), np.array(ap)


def _naive_ap(ranks, num_relevant):
    return np.array(
        [
            sum(j / rank for j, rank in enumerate(row[:r], start=1)) / r
            for row, r in zip(ranks.tolist(), num_relevant.tolist(), strict=True)
        ]
    )


def _naive_nmi(a, b):
    """NMI from the contingency table, by explicit loops (arithmetic-mean normalisation)."""
    a, b = list(a), list(b)
    n = len(a)
    ua, ub = sorted(set(a)), sorted(set(b))
    if len(ua) == len(ub) == 1:
        return 1.0
    table = {(x, y): 0 for x in ua for y in ub}
    for x, y in zip(a, b, strict=True):
        table[x, y] += 1
    pa = {x: a.count(x) / n for x in ua}
    pb = {y: b.count(y) / n for y in ub}
    mi = sum(c / n * np.log(c / n / (pa[x] * pb[y])) for (x, y), c in table.items() if c > 0)
    ha = -sum(p * np.log(p) for p in pa.values())
    hb = -sum(p * np.log(p) for p in pb.values())
    return 0.0 if mi <= 1e-15 else mi / ((ha + hb) / 2)


def test_precision_and_map_at_k_hand_worked():
    nl = np.array([[1, 0, 1, 0]])
    ql = np.array([1])
    for k, expected in ((1, 1.0), (2, 0.5), (3, 2 / 3), (4, 0.5)):
        np.testing.assert_allclose(precision_at_k(nl, ql, k), [expected])
    # hits at ranks 1 and 3: P(1) = 1, P(3) = 2/3
    r2 = np.array([2])
    np.testing.assert_allclose(map_at_k(nl, ql, r2, 1), [1.0])  # 1 / min(1, 2)
    np.testing.assert_allclose(map_at_k(nl, ql, r2, 2), [0.5])  # 1 / min(2, 2)
    np.testing.assert_allclose(map_at_k(nl, ql, r2, 3), [(1 + 2 / 3) / 2])
    np.testing.assert_allclose(map_at_k(nl, ql, r2, 4), [(1 + 2 / 3) / 2])
    # R larger than K is allowed: normaliser min(k, R) = k
    np.testing.assert_allclose(map_at_k(nl, ql, np.array([5]), 3), [(1 + 2 / 3) / 3])
    out = map_at_k(np.array([[-1, 7, 7]]), np.array([7]), np.array([9]), 2)
    np.testing.assert_allclose(out, [0.5 / 2])


def test_average_precision_hand_worked():
    ranks = np.array([[1, 3, 0], [2, 3, 5], [4, 0, 0]], dtype=np.int64)
    r = np.array([2, 3, 1])
    expected = [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 3 / 5) / 3, 1 / 4]
    out = average_precision(ranks, r)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(average_precision(np.array([[1, 2, 3]]), np.array([3])), [1.0])
    assert average_precision(np.zeros((0, 0), dtype=np.int64), np.zeros(0, np.int64)).shape == (0,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_map_at_k_and_ap_match_naive_loops(seed):
    rng = np.random.default_rng(seed)
    nq, big_k = 150, 10
    ql = rng.integers(0, 3, size=nq)
    nl = rng.integers(0, 3, size=(nq, big_k))
    r = rng.integers(1, 2 * big_k, size=nq)
    for k in (1, 3, 7, big_k):
        p, m = _naive_precision_map_at_k(nl, ql, r, k)
        np.testing.assert_allclose(precision_at_k(nl, ql, k), p, rtol=0, atol=1e-12)
        np.testing.assert_allclose(map_at_k(nl, ql, r, k), m, rtol=0, atol=1e-12)
    r = rng.integers(1, 8, size=nq)
    ranks = np.zeros((nq, 9), dtype=np.int64)
    for q in range(nq):
        ranks[q, : r[q]] = np.sort(rng.choice(np.arange(1, 40), size=r[q], replace=False))
    np.testing.assert_allclose(average_precision(ranks, r), _naive_ap(ranks, r), atol=1e-12)


def test_map_at_k_equals_ap_when_all_relevant_retrieved():
    rng = np.random.default_rng(3)
    nq, big_k = 60, 30
    ql = rng.integers(0, 4, size=nq)
    nl = rng.integers(0, 4, size=(nq, big_k))
    r = (nl == ql[:, None]).sum(axis=1)
    keep = r > 0
    nl, ql, r = nl[keep], ql[keep], r[keep]
    ranks = np.zeros((nl.shape[0], big_k), dtype=np.int64)
    for q, row in enumerate(nl == ql[:, None]):
        pos = np.flatnonzero(row) + 1
        ranks[q, : pos.size] = pos
    full = average_precision(ranks, r)
    for k in (int(ranks.max()), big_k):  # every relevant item within the first k
        np.testing.assert_allclose(map_at_k(nl, ql, r, k), full, rtol=0, atol=1e-12)
    assert np.any(map_at_k(nl, ql, r, int(ranks.max()) - 1) != full)


def test_metric_errors():
    nl = np.array([[1, 0], [0, 1]])
    ql = np.array([1, 1])
    for k in (0, 3, True):
        with pytest.raises(ValueError, match="k must be"):
            precision_at_k(nl, ql, k)
        with pytest.raises(ValueError, match="k must be"):
            map_at_k(nl, ql, np.array([1, 1]), k)
    with pytest.raises(ValueError, match="num_relevant must be >= 1"):
        map_at_k(nl, ql, np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="integer"):
        precision_at_k(nl.astype(float), ql, 1)
    bad_ranks = {
        "strictly increasing": [[2, 2]],
        "rank_j >= j": [[1, 1]],
        "0 after column": [[1, 3]],
    }
    for msg, ranks in bad_ranks.items():
        r = np.array([1]) if msg == "0 after column" else np.array([2])
        with pytest.raises(ValueError, match=msg):
            average_precision(np.array(ranks), r)
    with pytest.raises(ValueError, match="rank_j >= j"):
        average_precision(np.array([[0, 0]]), np.array([1]))
    with pytest.raises(ValueError, match="2-D integer"):
        average_precision(np.array([[1.0, 2.0]]), np.array([2]))
    with pytest.raises(ValueError, match="2-D integer"):
        average_precision(np.array([1, 2]), np.array([2]))
    with pytest.raises(ValueError, match="max\\(num_relevant\\)"):
        average_precision(np.array([[1, 2]]), np.array([3]))
    with pytest.raises(ValueError, match="num_relevant must be >= 1"):
        average_precision(np.array([[0, 0]]), np.array([0]))
    with pytest.raises(ValueError, match="one length"):
        nmi(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="one length"):
        nmi(np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="integer"):
        nmi(np.array([0.0, 1.0]), np.array([0, 1]))


def test_nmi_hand_worked_and_degenerate_cases():
    assert nmi(np.array([0, 0, 1, 1]), np.array([5, 5, 9, 9])) == pytest.approx(1.0)
    assert nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == 0.0
    # clusters [0,0,0,1] vs labels [0,0,1,1]: joint counts 2, 1 | 0, 1 of n = 4
    mi = 0.5 * np.log(4 / 3) + 0.25 * np.log(2 / 3) + 0.25 * np.log(2)
    h_c = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    expected = mi / ((h_c + np.log(2)) / 2)
    assert nmi(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(expected)
    assert nmi(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx(expected)
    # degenerate partitions, as scikit-learn: both trivial -> 1, one trivial -> 0
    assert nmi(np.array([3, 3, 3]), np.array([7, 7, 7])) == 1.0
    assert nmi(np.array([4]), np.array([2])) == 1.0
    assert nmi(np.zeros(0, dtype=int), np.zeros(0, dtype=int)) == 1.0
    assert nmi(np.array([3, 3, 3]), np.array([0, 1, 2])) == 0.0
    assert nmi(np.array([0, 1, 2]), np.array([3, 3, 3])) == 0.0


def test_nmi_matches_sklearn_pml_and_naive():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch = pytest.importorskip("torch")
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    rng = np.random.default_rng(0)
    cases = [
        (np.array([3, 3, 3]), np.array([7, 7, 7])),
        (np.array([3, 3, 3]), np.array([0, 1, 2])),
        (np.array([0, 1, 2]), np.array([3, 3, 3])),
        (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])),
    ]
    for n, kc, kl in ((50, 4, 5), (300, 10, 10), (200, 30, 3), (40, 40, 40)):
        cases.append((rng.integers(0, kc, n), rng.integers(0, kl, n)))
        labels = rng.integers(0, kl, n)  # correlated clustering: relabelled, partly noisy
        clusters = np.where(rng.random(n) < 0.7, (labels * 7 + 3) % 101, rng.integers(0, kc, n))
        cases.append((clusters, labels))
    for clusters, labels in cases:
        ours = nmi(clusters, labels)
        assert ours == pytest.approx(
            sklearn_metrics.normalized_mutual_info_score(labels, clusters), abs=1e-6
        )
        assert ours == pytest.approx(_naive_nmi(clusters, labels), abs=1e-9)
        calc = accuracy_calculator.AccuracyCalculator(
            include=("NMI",),
            device=torch.device("cpu"),
            kmeans_func=lambda x, k, c=clusters: torch.as_tensor(c),
        )
        x = rng.standard_normal((labels.size, 4)).astype(np.float32)
        assert ours == pytest.approx(calc.get_accuracy(x, labels)["NMI"], abs=1e-6)

"""Revisited Oxford/Paris scoring against a plain-loop oracle of revisitop's rules, on hand
computed cases, random rankings with junk, queries without positives and equal scores."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation.listed import (
    evaluate_revisited,
    positions_in_ranking,
    revisited_map,
    revisited_rankings,
    trapezoid_ap,
    without_junk,
)

KAPPAS = (1, 5, 10)
SETUPS = {
    "easy": ("easy", "junk hard"),
    "medium": ("easy hard", "junk"),
    "hard": ("hard", "junk easy"),
}


def oracle_query(ranking, ok, junk, kappas):
    """Walk one ranking item by item: a positive is placed at the count of non-junk items seen
    before it; junk never advances that count. AP sums trapezoids of the precision-recall
    curve, one per positive found; mP@k divides by min(k, 1-based rank of the last positive)."""
    ok_set, junk_set = set(int(i) for i in ok), set(int(i) for i in junk)
    places, clean = [], 0
    for item in ranking:
        if int(item) in ok_set:
            places.append(clean)
        if int(item) not in junk_set:
            clean += 1
    ap = 0.0
    for j, p in enumerate(places):
        left = 1.0 if p == 0 else j / p
        right = (j + 1) / (p + 1)
        ap += (left + right) / 2.0 / len(ok)
    prs = []
    for k in kappas:
        last = places[-1] + 1
        kq = min(last, k)
        prs.append(sum(1 for p in places if p + 1 <= kq) / kq)
    return ap, prs


def oracle(rankings, easy, hard, junk, kappas=KAPPAS):
    """setup -> (mAP, mean mP@k list, per-query AP with None for skipped queries)."""
    out = {}
    for setup, (ok_names, junk_names) in SETUPS.items():
        total, pr_total, used, aps = 0.0, [0.0] * len(kappas), 0, []
        for q in range(len(rankings)):
            lists = {"easy": list(easy[q]), "hard": list(hard[q]), "junk": list(junk[q])}
            ok = [i for name in ok_names.split() for i in lists[name]]
            bad = [i for name in junk_names.split() for i in lists[name]]
            if not ok:
                aps.append(None)
                continue
            ap, prs = oracle_query(rankings[q], ok, bad, kappas)
            total += ap
            pr_total = [a + b for a, b in zip(pr_total, prs, strict=True)]
            used += 1
            aps.append(ap)
        if used == 0:
            out[setup] = (None, None, aps)
        else:
            out[setup] = (total / used, [v / used for v in pr_total], aps)
    return out


def assert_equal_to_oracle(scores, expected):
    for setup, (m, mp, aps) in expected.items():
        got = scores[setup]
        if m is None:
            assert np.isnan(got.map) and np.isnan(got.mp).all()
            continue
        assert got.map == pytest.approx(m, abs=1e-9), setup
        np.testing.assert_allclose(got.mp, mp, rtol=0, atol=1e-9)
        for q, ap in enumerate(aps):
            if ap is None:
                assert np.isnan(got.aps[q]) and np.isnan(got.prs[q]).all()
            else:
                assert got.aps[q] == pytest.approx(ap, abs=1e-9)


def test_hand_computed_case():
    # query 0 ranks ids 3, 0, 4, 1, 2; easy [1], hard [2, 4], junk [3]
    # query 1 has no easy item: it is left out of the easy setup only
    rankings = np.array([[3, 0, 4, 1, 2], [0, 1, 2, 3, 4]])
    easy, hard, junk = [[1], []], [[2, 4], [0]], [[3], []]
    scores = revisited_rankings(rankings, easy, hard, junk, KAPPAS)
    # easy: id 1 at position 3, junk 3 and 4 before it -> position 1: AP (0 + 1/2) / 2
    assert scores["easy"].aps[0] == pytest.approx(0.25, abs=1e-12)
    np.testing.assert_allclose(scores["easy"].prs[0], [0.0, 0.5, 0.5], atol=1e-12)
    assert np.isnan(scores["easy"].aps[1])
    assert scores["easy"].map == pytest.approx(0.25, abs=1e-12)
    # medium: positions 2, 3, 4 less junk 3 at 0 -> 1, 2, 3:
    # AP = [(0 + 1/2) + (1/2 + 2/3) + (2/3 + 3/4)] / (2 * 3) = 37/72
    assert scores["medium"].aps[0] == pytest.approx(37 / 72, abs=1e-12)
    np.testing.assert_allclose(scores["medium"].prs[0], [0.0, 0.75, 0.75], atol=1e-12)
    assert scores["medium"].map == pytest.approx((37 / 72 + 1.0) / 2, abs=1e-12)
    # hard: ids 4 (position 2) and 2 (position 4) with junk 3 (0) and 1 (3) -> 1, 2:
    # AP = [(0 + 1/2) + (1/2 + 2/3)] / (2 * 2) = 5/12; mP@5 = 2 / min(5, 3)
    assert scores["hard"].aps[0] == pytest.approx(5 / 12, abs=1e-12)
    np.testing.assert_allclose(scores["hard"].prs[0], [0.0, 2 / 3, 2 / 3], atol=1e-12)
    np.testing.assert_allclose(scores["hard"].mp, [0.5, 5 / 6, 5 / 6], atol=1e-12)
    assert_equal_to_oracle(scores, oracle(rankings, easy, hard, junk))


def test_the_pieces_on_small_numbers():
    assert trapezoid_ap(np.array([0, 2]), 2) == pytest.approx((2 + 0.5 + 2 / 3) / 4, abs=1e-12)
    # a positive missed by a truncated ranking still counts in the denominator
    assert trapezoid_ap(np.array([0]), 4) == pytest.approx(0.25, abs=1e-12)
    np.testing.assert_array_equal(without_junk(np.array([1, 4, 6]), np.array([0, 4, 5])), [0, 3, 3])
    np.testing.assert_array_equal(positions_in_ranking(np.array([5, 2, 9, 1]), [1, 5]), [0, 3])
    with pytest.raises(ValueError, match="num_positives"):
        trapezoid_ap(np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="one entry per query"):
        revisited_map([np.array([0])], [], [1])


@pytest.mark.parametrize("seed", range(6))
def test_random_rankings_with_junk_equal_the_oracle(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 12, 60
    rankings = np.stack([rng.permutation(ng) for _ in range(nq)])
    easy, hard, junk = [], [], []
    for q in range(nq):
        chosen = rng.permutation(ng)
        n_e, n_h, n_j = rng.integers(0, 6, size=3)
        if q % 4 == 0:
            n_e = 0  # no easy positives: skipped in the easy setup
        if q % 5 == 0:
            n_h = 0  # no hard positives: skipped in the hard setup
        easy.append(chosen[:n_e])
        hard.append(chosen[n_e : n_e + n_h])
        junk.append(chosen[n_e + n_h : n_e + n_h + n_j])
    easy[1], hard[1] = np.array([], dtype=np.int64), np.array([], dtype=np.int64)  # none at all
    scores = revisited_rankings(rankings, easy, hard, junk, KAPPAS)
    assert_equal_to_oracle(scores, oracle(rankings, easy, hard, junk))
    assert np.isnan(scores["medium"].aps[1])


def test_an_item_listed_as_positive_and_junk_follows_the_position_rule():
    rankings = np.array([[4, 1, 0, 3, 2]])
    easy, hard, junk = [[1, 2]], [[]], [[1, 4]]
    scores = revisited_rankings(rankings, easy, hard, junk, KAPPAS)
    assert_equal_to_oracle(scores, oracle(rankings, easy, hard, junk))


def _setup_of(rng, nq, ng):
    easy, hard, junk = [], [], []
    for _ in range(nq):
        chosen = rng.permutation(ng)
        easy.append(chosen[:3])
        hard.append(chosen[3:5])
        junk.append(chosen[5:9])
    return easy, hard, junk


def test_a_search_scores_as_the_oracle_on_its_exact_ranking():
    rng = np.random.default_rng(3)
    xq = rng.standard_normal((9, 8))
    xg = rng.standard_normal((70, 8))
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xg /= np.linalg.norm(xg, axis=1, keepdims=True)
    easy, hard, junk = _setup_of(rng, 9, 70)
    result = evaluate_revisited(xq.astype(np.float32), xg.astype(np.float32), easy, hard, junk)
    scores = xq @ xg.T
    rankings = np.stack([np.lexsort((np.arange(70), -row)) for row in scores])
    expected = oracle(rankings, easy, hard, junk)
    for setup, (m, mp, _) in expected.items():
        assert result.metrics[f"map_{setup}"] == pytest.approx(m, abs=1e-9)
        for k, v in zip(KAPPAS, mp, strict=True):
            assert result.metrics[f"mp_{setup}@{k}"] == pytest.approx(v, abs=1e-9)
    assert result.num_queries == 9 and result.num_excluded == 0


def test_equal_scores_rank_by_ascending_gallery_id():
    # gallery rows are copies of three directions: many exact ties per query
    rng = np.random.default_rng(5)
    basis = np.eye(4, dtype=np.float32)[:3]
    xg = basis[rng.integers(0, 3, size=30)]
    xq = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0.6, 0.8, 0]], dtype=np.float32)
    easy, hard, junk = _setup_of(rng, 3, 30)
    result = evaluate_revisited(xq, xg, easy, hard, junk, keep_neighbors=30)
    scores = xq.astype(np.float64) @ xg.T.astype(np.float64)
    rankings = np.stack([np.lexsort((np.arange(30), -row)) for row in scores])
    np.testing.assert_array_equal(result.neighbor_ids, rankings)
    expected = oracle(rankings, easy, hard, junk)
    for setup, (m, _, _) in expected.items():
        assert result.metrics[f"map_{setup}"] == pytest.approx(m, abs=1e-9)
    # the reverse tie order would score otherwise: the rule is what is tested
    backwards = np.stack([np.lexsort((-np.arange(30), -row)) for row in scores])
    assert any(
        oracle(backwards, easy, hard, junk)[s][0] != pytest.approx(expected[s][0], abs=1e-9)
        for s in expected
    )


def test_queries_without_any_positive_are_left_out_and_counted():
    rng = np.random.default_rng(0)
    xq = rng.standard_normal((3, 4)).astype(np.float32)
    xg = rng.standard_normal((10, 4)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xg /= np.linalg.norm(xg, axis=1, keepdims=True)
    result = evaluate_revisited(xq, xg, [[0], [], []], [[1], [], [2]], [[], [3], []])
    assert result.num_queries == 2 and result.num_excluded == 1
    np.testing.assert_array_equal(result.query_rows, [0, 2])
    assert np.isnan(result.per_query["ap_easy"][1])  # query 2 has no easy item
    with pytest.raises(ValueError, match="no query has an easy or hard"):
        evaluate_revisited(xq, xg, [[], [], []], [[], [], []], [[1], [], []])
    with pytest.raises(ValueError, match="gallery position"):
        evaluate_revisited(xq, xg, [[10], [], []], [[], [], []], [[], [], []])

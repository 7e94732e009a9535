"""One tie rule on every search path: equal scores are ordered by ascending id.

Parity on data with exact duplicates (duplicated vectors under other labels, as real
benchmarks such as SOP and In-Shop hold duplicate images) against pytorch-metric-learning's
AccuracyCalculator (FAISS L2 k-NN) and a float64 stable-sort loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import retrieval.evaluation.gallery_search as search
from retrieval.evaluation import evaluate_embeddings
from retrieval.index import EmbeddingIndex


def duplicated(seed: int = 0, n: int = 3000, dim: int = 32, labels: int = 300):
    """n unit vectors in label clusters; 50 rows are exact copies of others under another
    label, 40 rows have a label of their own."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, labels, n)
    x = rng.normal(size=(labels, dim))[y] + rng.normal(size=(n, dim))
    src = rng.choice(n, 50, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 50, replace=False)
    x[dst] = x[src]
    y[dst] = (y[src] + 1 + rng.integers(0, labels - 1, 50)) % labels
    y[rng.choice(np.setdiff1d(np.arange(n), np.concatenate([src, dst])), 40, replace=False)] = (
        10_000 + np.arange(40)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def naive(xq, yq, xg, yg, loo):
    """R@1, MAP@R, R-precision and full mAP by a float64 stable sort (ties by ascending id)."""
    out = {"recall@1": [], "map@r": [], "r_precision": [], "map": []}
    scores = xq.astype(np.float64) @ xg.astype(np.float64).T
    for i in range(len(xq)):
        ids = np.arange(len(xg))
        if loo:
            ids = ids[ids != i]
        order = ids[np.argsort(-scores[i, ids], kind="stable")]
        rel = yg[order] == yq[i]
        r = int(rel.sum())
        if r == 0:
            continue
        hits = np.flatnonzero(rel) + 1
        first = rel[:r]
        out["recall@1"].append(float(rel[0]))
        out["map@r"].append(
            float(np.sum(np.cumsum(first)[first] / (np.flatnonzero(first) + 1)) / r)
        )
        out["r_precision"].append(float(first.mean()))
        out["map"].append(float(np.mean(np.arange(1, r + 1) / hits)))
    return {k: float(np.mean(v)) for k, v in out.items()}


def pml(xq, yq, xg, yg, loo):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    names = ("precision_at_1", "mean_average_precision_at_r", "r_precision")
    calc = AccuracyCalculator(include=names, device=torch.device("cpu"))
    got = calc.get_accuracy(
        torch.from_numpy(xq),
        torch.from_numpy(yq),
        torch.from_numpy(xg),
        torch.from_numpy(yg),
        ref_includes_query=loo,
    )
    return {
        "recall@1": got["precision_at_1"],
        "map@r": got["mean_average_precision_at_r"],
        "r_precision": got["r_precision"],
    }


METRICS = ["recall", "map@r", "r_precision", "map"]


@pytest.mark.parametrize("path", ["faiss", "self_join"])
def test_leave_one_out_with_duplicates_matches_pml_and_a_naive_loop(path, monkeypatch):
    x, y = duplicated()
    # both exact search paths of leave-one-out: FAISS k + 1 with the own id dropped, and
    # the symmetric self-join
    monkeypatch.setattr(search, "self_join_pays_off", lambda n, d, k: path == "self_join")
    ours = evaluate_embeddings(x, y, ks=[1], metrics=METRICS).metrics
    expected = naive(x, y, x, y, loo=True)
    reference = pml(x, y, x, y, loo=True)
    for name in ("recall@1", "map@r", "r_precision"):
        assert ours[name] == pytest.approx(expected[name], abs=1e-9), name
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), name
    assert ours["map"] == pytest.approx(expected["map"], abs=1e-9)


def test_query_gallery_with_duplicates_matches_pml_and_a_naive_loop():
    x, y = duplicated(seed=1)
    xq, yq, xg, yg = x[:500], y[:500], x[500:], y[500:]
    ours = evaluate_embeddings(xq, yq, xg, yg, ks=[1], metrics=METRICS).metrics
    expected = naive(xq, yq, xg, yg, loo=False)
    reference = pml(xq, yq, xg, yg, loo=False)
    for name in ("recall@1", "map@r", "r_precision"):
        assert ours[name] == pytest.approx(expected[name], abs=1e-9), name
        assert ours[name] == pytest.approx(reference[name], abs=1e-6), name
    assert ours["map"] == pytest.approx(expected["map"], abs=1e-9)


def test_the_index_orders_equal_scores_by_ascending_id_even_across_the_cut():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(6, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    # one vector copied 40 times among others: every cut inside its group must keep the
    # smallest ids of the group
    picks = rng.integers(1, 6, size=200)
    picks[rng.choice(200, 40, replace=False)] = 0
    x = base[picks]
    group = np.flatnonzero(picks == 0)
    index = EmbeddingIndex(8)
    index.add(x)
    for k in (1, 3, 17, 39, 40, 41, 120):
        scores, ids = index.search(base[:1], k)
        assert ids[0, : min(k, 40)].tolist() == group[: min(k, 40)].tolist(), k
        assert np.all(np.diff(scores, axis=1) <= 0)
    # a copy group straddling the cut of many queries at once, chunked
    queries = np.repeat(base[:1], 7, axis=0)
    _, ids = index.search(queries, 25, chunk_size=3)
    assert (ids == group[:25]).all()


def test_an_approximate_index_orders_the_ties_it_finds_by_ascending_id():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(4, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = base[rng.integers(0, 4, size=300)]
    index = EmbeddingIndex(8, factory="HNSW32")
    index.add(x)
    scores, ids = index.search(base, 50)
    for row_scores, row_ids in zip(scores, ids, strict=True):
        for value in np.unique(row_scores):
            same = row_ids[row_scores == value]
            assert np.all(np.diff(same) > 0)

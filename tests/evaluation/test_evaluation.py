"""Tests of retrieval.evaluation against pytorch-metric-learning and naive numpy oracles."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from retrieval.evaluation import RetrievalResult, evaluate_embeddings, search_excluding_self
from retrieval.index import EmbeddingIndex

THREE = ("recall", "map@r", "r_precision")


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _tie_free(xq: np.ndarray, xg: np.ndarray, depth: int, loo: bool) -> bool:
    """Whether the top ``depth + 1`` scores of every query differ pairwise by more than 2e-6.

    float32 rounding then cannot reorder them, so every exact search agrees on the ranking.
    """
    scores = xq.astype(np.float64) @ xg.astype(np.float64).T
    if loo:
        np.fill_diagonal(scores, -np.inf)
    top = -np.sort(-scores, axis=1)[:, : depth + 1]
    return bool(np.diff(-top, axis=1).min() > 2e-6)


def _pml_accuracy(*args, **kwargs) -> dict[str, float]:
    torch = pytest.importorskip("torch")
    ac_module = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    ac = ac_module.AccuracyCalculator(
        include=(
            "precision_at_1",
            "r_precision",
            "mean_average_precision_at_r",
            "mean_average_precision",
        ),
        k=None,  # the whole reference set: mean_average_precision is then full mAP
        device=torch.device("cpu"),
    )
    return ac.get_accuracy(*args, **kwargs)


def _check_parity(ours: RetrievalResult, theirs: dict[str, float]) -> None:
    assert ours.metrics["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours.metrics["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours.metrics["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours.metrics["map"] == pytest.approx(theirs["mean_average_precision"], abs=1e-6)
    assert ours.metrics["precision@1"] == ours.metrics["recall@1"]
    # guard against a vacuous comparison (all zeros or all ones)
    assert 0.0 < ours.metrics["map@r"] < 1.0


def _leave_one_out_data(seed: int = 0, n: int = 120, dim: int = 16):
    """Unit vectors and int labels (six of them lone) without near-ties; deterministic in seed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 35, size=n)
    labels[:6] = 100 + np.arange(6)
    depth = max(8, int(np.bincount(labels).max()))
    while True:
        x = _unit(rng.standard_normal((n, dim)))
        if _tie_free(x, x, depth, loo=True):
            return x, labels


def _query_gallery_data(seed: int = 1, dim: int = 16):
    rng = np.random.default_rng(seed)
    ql, gl = rng.integers(0, 60, size=90), rng.integers(0, 50, size=200)
    depth = max(8, int(np.bincount(gl).max()))
    while True:
        q, g = _unit(rng.standard_normal((90, dim))), _unit(rng.standard_normal((200, dim)))
        if _tie_free(q, g, depth, loo=False):
            return q, ql, g, gl


def test_leave_one_out_parity_with_pytorch_metric_learning():
    x, labels = _leave_one_out_data()
    counts = np.bincount(labels)
    ours = evaluate_embeddings(x, labels)
    theirs = _pml_accuracy(x, labels, ref_includes_query=True)
    _check_parity(ours, theirs)
    lone = int(np.sum(counts[labels] == 1))
    assert lone >= 6
    assert (ours.num_queries, ours.num_excluded) == (len(x) - lone, lone)
    families = ("recall", "precision", "map")
    assert set(ours.metrics) == {f"{f}@{k}" for f in families for k in (1, 2, 4, 8)} | {
        "map@r",
        "r_precision",
        "map",
    }


def test_query_gallery_parity_with_pytorch_metric_learning():
    q, ql, g, gl = _query_gallery_data()
    ours = evaluate_embeddings(q, ql, g, gl)
    theirs = _pml_accuracy(q, ql, g, gl, ref_includes_query=False)
    _check_parity(ours, theirs)
    excluded = int(np.sum(~np.isin(ql, gl)))
    assert excluded > 0
    assert (ours.num_queries, ours.num_excluded) == (90 - excluded, excluded)


def test_string_labels_give_the_same_result():
    x, labels = _leave_one_out_data(seed=2)
    as_ints = evaluate_embeddings(x, labels)
    as_strs = evaluate_embeddings(x, np.array([f"class-{v}" for v in labels]))
    as_objs = evaluate_embeddings(x, [("c", int(v)) if v % 2 else int(v) for v in labels])
    assert as_ints == as_strs == as_objs
    # an int label never equals its string spelling
    q, g = x[:4], x[4:8]
    same = evaluate_embeddings(q, [1, 1, 2, 2], g, [1, 2, 1, 2])
    assert same.num_excluded == 0
    with pytest.raises(ValueError, match="no query has a relevant"):
        evaluate_embeddings(q, [1, 1, 2, 2], g, ["1", "2", "1", "2"])


def _naive_recall(xq, lq, xg, lg, k, loo):
    scores = xq.astype(np.float64) @ xg.astype(np.float64).T
    if loo:
        np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1)
    hits = []
    for i in range(len(xq)):
        relevant = np.sum(lg == lq[i]) - (1 if loo else 0)
        if relevant > 0:
            hits.append(float(np.any(lg[order[i, :k]] == lq[i])))
    return float(np.mean(hits))


def test_recall_at_k_matches_brute_force_argsort():
    x, labels = _leave_one_out_data(seed=3)
    ours = evaluate_embeddings(x, labels, ks=(1, 2, 4, 8))
    q, ql, g, gl = _query_gallery_data(seed=4)
    ours_qg = evaluate_embeddings(q, ql, g, gl, ks=(1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        expected = _naive_recall(x, labels, x, labels, k, loo=True)
        assert ours.metrics[f"recall@{k}"] == pytest.approx(expected, abs=1e-12)
        expected_qg = _naive_recall(q, ql, g, gl, k, loo=False)
        assert ours_qg.metrics[f"recall@{k}"] == pytest.approx(expected_qg, abs=1e-12)
    assert ours.metrics["recall@1"] < ours.metrics["recall@8"]


def _with_unique_labels(n_extra: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal((n_extra, dim))), list(range(1000, 1000 + n_extra))


def test_duplicate_of_the_query_is_a_hit_at_rank_one():
    x, labels = _with_unique_labels(10, 8, seed=5)
    x[5] = x[0]
    labels[5] = labels[0]
    result = evaluate_embeddings(x, labels, ks=(1,), metrics=THREE)
    assert (result.num_queries, result.num_excluded) == (2, 8)
    assert result.metrics == {"recall@1": 1.0, "map@r": 1.0, "r_precision": 1.0}


def test_duplicate_with_another_label_is_a_miss_not_the_query_itself():
    x, labels = _with_unique_labels(10, 8, seed=6)
    x[5] = x[0]
    x[1] = _unit(-x[0:1] + 0.05 * x[3:4])[0]
    x[2] = _unit(-x[0:1] + 0.05 * x[4:5])[0]
    labels[0] = labels[1] = 0  # the nearest neighbour of each scored query has the other label
    labels[5] = labels[2] = 1
    result = evaluate_embeddings(x, labels, ks=(1,), metrics=THREE)
    assert result.num_queries == 4
    assert result.metrics == {"recall@1": 0.0, "map@r": 0.0, "r_precision": 0.0}


def test_search_excluding_self_drops_the_query_by_index():
    rng = np.random.default_rng(7)
    x = _unit(rng.standard_normal((12, 8)))
    x[1:5] = x[0]  # items 0..4 are five exact copies
    index = EmbeddingIndex(8, use_gpu=False)
    index.add(x)
    for k in (1, 2, 3, 4, 6, 20):
        scores, ids = search_excluding_self(index, x, np.arange(12), k)
        np.testing.assert_allclose(scores, np.sum(x[:, None, :] * x[ids], axis=2), atol=1e-6)
        assert ids.shape == (12, min(k, 11))
        assert not np.any(ids == np.arange(12)[:, None])
        copies = ids[:5, : min(k, 4)]
        assert np.all(copies < 5)  # other copies first, in any tie order
        assert len({tuple(sorted(row)) for row in copies.tolist()}) >= (1 if k >= 4 else 2)


def test_k_larger_than_gallery_takes_the_whole_gallery():
    rng = np.random.default_rng(8)
    x = _unit(rng.standard_normal((6, 8)))
    labels = [0, 0, 1, 1, 1, 2]
    result = evaluate_embeddings(x, labels, ks=(1, 5, 8, 16))
    assert result.metrics["recall@16"] == result.metrics["recall@8"] == 1.0
    assert result.metrics["recall@5"] == 1.0
    assert (result.num_queries, result.num_excluded) == (5, 1)
    g = x[:3]
    qg = evaluate_embeddings(x, labels, g, labels[:3], ks=(3, 50))
    assert qg.metrics["recall@50"] == qg.metrics["recall@3"] == 1.0
    assert qg.num_excluded == 1


def test_unnormalised_input_warns_and_matches_normalised():
    x, labels = _leave_one_out_data(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = evaluate_embeddings(x, labels)
    scales = np.random.default_rng(10).uniform(0.2, 5.0, size=(len(x), 1))
    with pytest.warns(UserWarning, match="not L2-normalised") as record:
        scaled = evaluate_embeddings(x.astype(np.float64) * scales, labels)
    assert len(record) == 1
    assert scaled.num_queries == expected.num_queries
    for name, value in expected.metrics.items():
        assert scaled.metrics[name] == pytest.approx(value, abs=1e-9)


def test_invalid_inputs_raise():
    x = _unit(np.random.default_rng(11).standard_normal((20, 16)))
    labels = np.arange(20) % 5
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="query contains NaN"):
        evaluate_embeddings(bad, labels)
    with pytest.raises(ValueError, match="gallery contains NaN"):
        evaluate_embeddings(x, labels, bad, labels)
    with pytest.raises(ValueError, match="dim"):
        evaluate_embeddings(x, labels, x[:, :8], labels)
    with pytest.raises(ValueError, match="query_labels"):
        evaluate_embeddings(x, labels[:-1])
    with pytest.raises(ValueError, match="gallery_labels"):
        evaluate_embeddings(x, labels, x, labels[:-1])
    with pytest.raises(ValueError, match="together"):
        evaluate_embeddings(x, labels, x)
    with pytest.raises(ValueError, match="query is empty"):
        evaluate_embeddings(x[:0], labels[:0])
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate_embeddings(x, labels, x[:0], labels[:0])
    with pytest.raises(ValueError, match="2-D"):
        evaluate_embeddings(x[0], labels[:1])
    with pytest.raises(ValueError, match="floating"):
        evaluate_embeddings(np.ones((20, 4), dtype=np.int64), labels)
    with pytest.raises(ValueError, match="zero vectors"):
        evaluate_embeddings(np.zeros((20, 4)), labels)
    for ks in ((), (0, 1), (1.5,)):
        with pytest.raises(ValueError, match="ks"):
            evaluate_embeddings(x, labels, ks=ks)
    with pytest.raises(ValueError, match="no query has a relevant"):
        evaluate_embeddings(x, np.arange(20))
    with pytest.raises(ValueError, match="factory"):
        evaluate_embeddings(x, labels, factory="NotAnIndex")
    with pytest.raises(ValueError, match="metrics must be"):
        evaluate_embeddings(x, labels, metrics=("recall", "accuracy"))


def test_retrieval_result_is_a_validated_value_object():
    result = RetrievalResult(metrics={"recall@1": np.float64(0.5)}, num_queries=3, num_excluded=0)
    assert type(result.metrics["recall@1"]) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.num_queries = 4  # type: ignore[misc]
    for metrics in ({"map@r": 1.5}, {"map@r": float("nan")}):
        with pytest.raises(ValueError, match="map@r"):
            RetrievalResult(metrics=metrics, num_queries=1, num_excluded=0)
    with pytest.raises(ValueError, match="num_excluded"):
        RetrievalResult(metrics={}, num_queries=1, num_excluded=-1)
    with pytest.raises(ValueError, match="num_queries"):
        RetrievalResult(metrics={}, num_queries=0, num_excluded=2)


def test_approximate_index_is_reported_beside_exact_search():
    x, labels = _leave_one_out_data(seed=12, n=400, dim=16)
    exact = evaluate_embeddings(x, labels)
    assert exact.exact_metrics is None and exact.index["factory"] == "Flat"
    assert exact.index["bytes_per_vector"] == 16 * 4
    # probing every list is exact search through an IVF index
    full = evaluate_embeddings(x, labels, factory="IVF8,Flat", search_params="nprobe=8")
    assert full.metrics == exact.metrics == full.exact_metrics
    assert full.index["knn_recall@8"] == 1.0
    # one list of eight: misses neighbours, and the report shows how many
    coarse = evaluate_embeddings(x, labels, factory="IVF8,Flat", search_params="nprobe=1")
    assert coarse.exact_metrics == exact.metrics
    assert coarse.index["knn_recall@8"] < 1.0
    assert coarse.metrics["recall@8"] < exact.metrics["recall@8"]
    assert coarse.metrics["map"] == exact.metrics["map"]  # full mAP is always exact
    no_compare = evaluate_embeddings(x, labels, factory="HNSW8", compare_exact=False)
    assert no_compare.exact_metrics is None and "knn_recall@1" not in no_compare.index


def test_per_query_values_and_kept_neighbours():
    q, ql, g, gl = _query_gallery_data(seed=13)
    result = evaluate_embeddings(q, ql, g, gl, keep_neighbors=3, chunk_size=7)
    rows = result.query_rows
    assert rows is not None and len(rows) == result.num_queries
    assert np.all(np.isin(ql[rows], gl)) and not np.any(np.isin(np.delete(ql, rows), gl))
    for name, values in result.per_query.items():
        assert values.mean() == pytest.approx(result.metrics[name], abs=1e-12)
    ids, scores = result.neighbor_ids, result.neighbor_scores
    assert ids is not None and scores is not None and ids.shape == scores.shape == (len(rows), 3)
    brute = q[rows] @ g.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :3])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, axis=1), atol=1e-6)
    hit = (gl[ids[:, 0]] == ql[rows]).astype(float)
    np.testing.assert_array_equal(result.per_query["recall@1"], hit)
    same = evaluate_embeddings(q, ql, g, gl, keep_neighbors=3, chunk_size=4096)
    assert same == result


def test_nmi_is_that_of_kmeans_clusters_of_the_queries():
    from retrieval.evaluation.metrics import nmi
    from retrieval.index import kmeans

    rng = np.random.default_rng(14)
    centres = 4 * rng.standard_normal((6, 8))
    labels = np.repeat(np.arange(6), 20)
    x = _unit(centres[labels] + 0.3 * rng.standard_normal((120, 8)))
    result = evaluate_embeddings(x, labels, metrics=("nmi", "recall"), seed=3)
    expected = nmi(kmeans(x, 6, seed=3), labels)
    assert result.metrics["nmi"] == pytest.approx(expected, abs=1e-12)
    assert result.metrics["nmi"] > 0.9  # well-separated clusters
    shuffled = evaluate_embeddings(x, rng.permutation(labels), metrics=("nmi",), seed=3)
    assert shuffled.metrics["nmi"] < 0.2

"""Tests of retrieval.evaluation.ranking against a naive full sort, FAISS and PML.

Most data is "dyadic": coordinates are multiples of 1/16, so every inner product is exact in
float32 whatever the summation order. torch, numpy and FAISS then agree bit for bit on every
score, and the many exact ties exercise the tie rule instead of being left to rounding.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import retrieval.evaluation.ranking
from retrieval.evaluation.metrics import average_precision, map_at_k, precision_at_k
from retrieval.evaluation.ranking import relevant_ranks


@pytest.fixture(params=["auto", "scan", "sort"])
def counting(request, monkeypatch):
    """Run a test with the automatic choice, and with only scans or only sorts of a row."""
    if request.param != "auto":
        always_sort = request.param == "sort"
        monkeypatch.setattr(retrieval.evaluation.ranking, "_use_sort", lambda r, ng: always_sort)
    return request.param


def _dyadic(rng, n, d=8):
    return (np.round(rng.standard_normal((n, d)) * 4) / 16).astype(np.float32)


def _with_duplicates(rng, x, labels, n_same, n_other):
    """Append exact copies of some rows: n_same with their label, n_other with another one."""
    src = rng.choice(x.shape[0], size=n_same + n_other, replace=False)
    new_labels = labels[src].copy()
    new_labels[n_same:] = labels.max() + 1 + np.arange(n_other) % 3
    return np.concatenate([x, x[src]]), np.concatenate([labels, new_labels])


def _naive(xq, xg, qc, gc, self_ids=None, larger_id_first=False):
    """Full ranking of each query by a stable sort on (-score, id) (the project's tie rule;
    ``larger_id_first``: on (-score, -id)); returns (orders, ranks)."""
    scores = xq.astype(np.float64) @ xg.astype(np.float64).T
    orders, ranks = [], []
    for q in range(xq.shape[0]):
        ids = np.arange(xg.shape[0])
        if self_ids is not None:
            ids = ids[ids != self_ids[q]]
        tie = -ids if larger_id_first else ids
        order = ids[np.lexsort((tie, -scores[q, ids]))]
        orders.append(order)
        ranks.append(np.flatnonzero(gc[order] == qc[q]) + 1)
    return orders, ranks


def _padded(ranks_list):
    r = np.array([len(x) for x in ranks_list], dtype=np.int64)
    out = np.zeros((len(ranks_list), int(r.max()) if r.size else 0), dtype=np.int64)
    for q, x in enumerate(ranks_list):
        out[q, : len(x)] = x
    return out, r


def _data(seed, n=120, num_labels=12):
    rng = np.random.default_rng(seed)
    x = _dyadic(rng, n)
    labels = rng.integers(0, num_labels, size=n)
    labels[:3] = [100, 101, 102]  # labels with a single image
    return _with_duplicates(rng, x, labels, n_same=12, n_other=6)


def test_hand_worked_example(counting):
    # 1-D embeddings: scores are products; items 1 and 2 tie at 0.5 -> the smaller id first
    xg = np.array([[1.0], [0.5], [0.5], [-1.0]], dtype=np.float32)
    gc = np.array([0, 1, 0, 1])
    ranks, r = relevant_ranks(xg[:1], xg, np.array([0]), gc)  # order 0, 1, 2, 3
    np.testing.assert_array_equal(ranks, [[1, 3]])
    np.testing.assert_array_equal(r, [2])
    ranks, r = relevant_ranks(xg[:1], xg, np.array([1]), gc)
    np.testing.assert_array_equal(ranks, [[2, 4]])
    # leave-one-out: query q's own item leaves its ranking
    ranks, r = relevant_ranks(xg, xg, gc, gc, self_ids=np.arange(4))
    # q0: 1,2,3 -> item 2 at 2; q1: 0,2,3 -> item 3 at 3; q2: 0,1,3 -> item 0 at 1;
    # q3: scores -1,-.5,-.5 -> 1,2,0 -> item 1 at 1
    np.testing.assert_array_equal(ranks, [[2], [3], [1], [1]])
    np.testing.assert_array_equal(r, [1, 1, 1, 1])
    assert ranks.dtype == np.int64 and r.dtype == np.int64


def test_duplicate_of_the_query_stays_in_its_results(counting):
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    codes = np.array([0, 0, 1])
    ranks, r = relevant_ranks(x, x, codes, codes, self_ids=np.arange(3))
    np.testing.assert_array_equal(ranks, [[1], [1], [0]])
    np.testing.assert_array_equal(r, [1, 1, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_full_sort(seed, counting):
    x, labels = _data(seed)
    n = x.shape[0]
    expected, expected_r = _padded(_naive(x, x, labels, labels, np.arange(n))[1])
    for chunk_size in (1, 7, 64, 10_000):
        ranks, r = relevant_ranks(
            x, x, labels, labels, self_ids=np.arange(n), chunk_size=chunk_size
        )
        np.testing.assert_array_equal(r, expected_r)
        np.testing.assert_array_equal(ranks, expected)
    assert (r == 0).sum() >= 3 and np.all(ranks[r == 0] == 0)
    # separate queries (some with labels absent from the gallery) and gallery
    rng = np.random.default_rng(seed + 10)
    xq = np.concatenate([_dyadic(rng, 30), x[:10]])
    qc = np.concatenate([rng.integers(0, 30, size=30), labels[:10]])
    expected, expected_r = _padded(_naive(xq, x, qc, labels)[1])
    ranks, r = relevant_ranks(xq, x, qc, labels, chunk_size=4)
    np.testing.assert_array_equal(r, expected_r)
    np.testing.assert_array_equal(ranks, expected)
    assert np.any(r == 0)


def test_ties_follow_the_embedding_index_not_raw_faiss(counting):
    faiss = pytest.importorskip("faiss")
    from retrieval.index import EmbeddingIndex

    for seed in range(3):
        x, labels = _data(seed)
        n = x.shape[0]
        index = EmbeddingIndex(x.shape[1])
        index.add(x)
        _, ids = index.search(x, n)
        from_index = []
        for q in range(n):
            order = ids[q][ids[q] != q]
            from_index.append(np.flatnonzero(labels[order] == labels[q]) + 1)
        expected, _ = _padded(from_index)
        ranks, _ = relevant_ranks(x, x, labels, labels, self_ids=np.arange(n))
        np.testing.assert_array_equal(ranks, expected)
        # FAISS's own IndexFlatIP lists ties by descending id; the data has ties across
        # labels, so that order gives other ranks
        raw = faiss.IndexFlatIP(x.shape[1])
        raw.add(x)
        _, raw_ids = raw.search(x, n)
        from_raw = [
            np.flatnonzero(labels[raw_ids[q][raw_ids[q] != q]] == labels[q]) + 1 for q in range(n)
        ]
        assert np.any(_padded(from_raw)[0] != expected)
        larger_first, _ = _padded(_naive(x, x, labels, labels, np.arange(n), True)[1])
        np.testing.assert_array_equal(_padded(from_raw)[0], larger_first)


def _pml_calculator(metrics, k, ip):
    torch = pytest.importorskip("torch")
    faiss = pytest.importorskip("faiss")
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    inference = pytest.importorskip("pytorch_metric_learning.utils.inference")
    knn = inference.FaissKNN(index_init_fn=faiss.IndexFlatIP) if ip else None
    return accuracy_calculator.AccuracyCalculator(
        include=metrics, k=k, device=torch.device("cpu"), knn_func=knn
    )


def _ours(xq, ql, xg, gl, loo):
    """Our mAP, precision@1 and the orders, over the queries with a relevant item (as PML)."""
    self_ids = np.arange(xq.shape[0]) if loo else None
    ranks, r = relevant_ranks(xq, xg, ql, gl, self_ids=self_ids)
    keep = r > 0
    orders, _ = _naive(xq, xg, ql, gl, self_ids)
    top1 = np.array([gl[o[:1]] for o in orders])[keep]
    return average_precision(ranks[keep], r[keep]), precision_at_k(top1, ql[keep], 1)


@pytest.mark.parametrize("across_labels", [True, False])
def test_full_map_matches_pml(across_labels):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        # PML's default L2 k-NN on unit vectors orders ties by ascending id, as we do;
        # exact duplicates with their own label, and (across_labels) with other labels
        x = rng.standard_normal((100, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        labels = rng.integers(0, 20, size=100)
        labels[:2] = [50, 51]
        x, labels = _with_duplicates(rng, x, labels, n_same=10, n_other=8 if across_labels else 0)
        calc = _pml_calculator(("mean_average_precision", "precision_at_1"), None, ip=False)
        pml = calc.get_accuracy(x, labels, x, labels, ref_includes_query=True)
        ap, p1 = _ours(x, labels, x, labels, loo=True)
        assert ap.mean() == pytest.approx(pml["mean_average_precision"], abs=1e-6)
        assert p1.mean() == pytest.approx(pml["precision_at_1"], abs=1e-6)
        # separate query and gallery, some queries without a relevant gallery item
        n_q = 30
        xq, ql, xg, gl = x[:n_q], labels[:n_q], x[n_q:], labels[n_q:]
        assert np.any(~np.isin(ql, gl))
        pml = calc.get_accuracy(xq, ql, xg, gl, ref_includes_query=False)
        ap, p1 = _ours(xq, ql, xg, gl, loo=False)
        assert ap.mean() == pytest.approx(pml["mean_average_precision"], abs=1e-6)
        assert p1.mean() == pytest.approx(pml["precision_at_1"], abs=1e-6)


def test_map_at_k_equals_full_ap_when_all_relevant_within_k():
    x, labels = _data(0)
    n = x.shape[0]
    ranks, r = relevant_ranks(x, x, labels, labels, self_ids=np.arange(n))
    keep = r > 0
    orders, _ = _naive(x, x, labels, labels, np.arange(n))
    nl = labels[np.stack(orders)][keep]
    ql, r, ranks = labels[keep], r[keep], ranks[keep]
    full = average_precision(ranks, r)
    k_all = int(ranks.max())  # every relevant item is within the first k_all
    np.testing.assert_allclose(map_at_k(nl, ql, r, k_all), full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(map_at_k(nl, ql, r, n - 1), full, rtol=0, atol=1e-12)


def test_map_at_k_normaliser_differs_from_pml():
    """PML's MAP with an int k divides by R where ours divides by min(k, R)."""
    torch = pytest.importorskip("torch")
    faiss = pytest.importorskip("faiss")
    inference = pytest.importorskip("pytorch_metric_learning.utils.inference")
    x, labels = _data(1)
    k = 3
    calc = _pml_calculator(("mean_average_precision",), k, ip=True)
    pml = calc.get_accuracy(x, labels, x, labels, ref_includes_query=True)
    # the same k-NN lists PML uses (FAISS keeps the smaller ids when the cut splits a tie)
    xt = torch.from_numpy(x)
    _, ids = inference.FaissKNN(index_init_fn=faiss.IndexFlatIP)(xt, k, xt, True)
    counts = np.bincount(labels)
    r = counts[labels] - 1
    keep = r > 0
    nl, ql, r = labels[ids.numpy()][keep], labels[keep], r[keep]
    ours = map_at_k(nl, ql, r, k)
    assert np.any(r > k)
    assert (ours * np.minimum(r, k) / r).mean() == pytest.approx(
        pml["mean_average_precision"], abs=1e-6
    )
    assert ours.mean() > pml["mean_average_precision"] + 1e-3


def test_empty_inputs():
    x = np.zeros((0, 4), dtype=np.float32)
    y = np.ones((3, 4), dtype=np.float32)
    no_codes = np.zeros(0, dtype=np.int64)
    ranks, r = relevant_ranks(x, y, no_codes, np.arange(3))
    assert ranks.shape == (0, 0) and r.shape == (0,)
    ranks, r = relevant_ranks(y, x, np.arange(3), no_codes)
    assert ranks.shape == (3, 0)
    np.testing.assert_array_equal(r, [0, 0, 0])


def test_errors():
    x = np.eye(3, dtype=np.float32)
    codes = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="xq must be a 2-D float"):
        relevant_ranks(x[0], x, codes[:1], codes)
    with pytest.raises(ValueError, match="xg must be a 2-D float"):
        relevant_ranks(x, np.eye(3, dtype=np.int64), codes, codes)
    with pytest.raises(ValueError, match="dimension"):
        relevant_ranks(x[:, :2], x, codes, codes)
    with pytest.raises(ValueError, match="NaN"):
        relevant_ranks(np.full((3, 3), np.nan, dtype=np.float32), x, codes, codes)
    with pytest.raises(ValueError, match="query_codes must be an integer"):
        relevant_ranks(x, x, codes.astype(float), codes)
    with pytest.raises(ValueError, match="gallery_codes must be an integer array of shape"):
        relevant_ranks(x, x, codes, codes[:2])
    with pytest.raises(ValueError, match="self_ids must be an integer array of shape"):
        relevant_ranks(x, x, codes, codes, self_ids=np.arange(2))
    with pytest.raises(ValueError, match="self_ids must lie in"):
        relevant_ranks(x, x, codes, codes, self_ids=np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="own code"):
        relevant_ranks(x, x, codes, codes, self_ids=np.array([0, 2, 1]))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="chunk_size"):
            relevant_ranks(x, x, codes, codes, chunk_size=bad)


def test_module_does_not_import_faiss():
    import retrieval.evaluation.ranking as ranking

    tree = ast.parse(Path(ranking.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "faiss" not in imported and "torch" in imported

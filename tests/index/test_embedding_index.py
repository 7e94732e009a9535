"""Tests of EmbeddingIndex building, training, adding and searching, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex, knn_recall
from tests.index.synthetic import brute_force, clustered, unit


def test_flat_matchesbrute_force():
    rng = np.random.default_rng(0)
    xb = unit(rng.standard_normal((500, 16)))
    xq = unit(rng.standard_normal((40, 16)))
    index = EmbeddingIndex(16, "Flat", use_gpu=False)
    index.add(xb)
    assert (index.ntotal, index.dim, index.factory) == (500, 16, "Flat")
    scores, ids = index.search(xq, 10)
    exp_scores, exp_ids = brute_force(xq, xb, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (40, 10)
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, atol=1e-5)


def test_add_converts_dtype_and_layout():
    rng = np.random.default_rng(1)
    xb = unit(rng.standard_normal((16, 50))).T.astype(np.float64)  # (50, 16), F-order
    index = EmbeddingIndex(16, use_gpu=False)
    index.add(xb)
    index.add(xb[:0])
    _, ids = index.search(xb[:5], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(2)
    xb = unit(rng.standard_normal((300, 8)))
    xq = unit(rng.standard_normal((103, 8)))
    index = EmbeddingIndex(8, use_gpu=False)
    index.add(xb)
    s_all, i_all = index.search(xq, 7, chunk_size=4096)
    for chunk in (1, 10, 102):
        s_chunk, i_chunk = index.search(xq, 7, chunk_size=chunk)
        np.testing.assert_array_equal(i_chunk, i_all)
        np.testing.assert_array_equal(s_chunk, s_all)


def test_k_larger_than_ntotal_is_clamped():
    rng = np.random.default_rng(3)
    xb = unit(rng.standard_normal((5, 4)))
    index = EmbeddingIndex(4, use_gpu=False)
    index.add(xb)
    scores, ids = index.search(xb, 50)
    assert scores.shape == ids.shape == (5, 5)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(5), (5, 1)))
    empty_scores, empty_ids = index.search(xb[:0], 3)
    assert empty_scores.shape == empty_ids.shape == (0, 3)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat"])
def test_approximate_indexes_reach_recall(factory):
    rng = np.random.default_rng(4)
    xb, xq = clustered(rng, (2000, 200))
    index = EmbeddingIndex(32, factory, use_gpu=False)
    assert index.is_trained == (factory == "HNSW32")
    index.train(xb)
    index.add(xb)
    _, ids = index.search(xq, 10)
    _, exact = brute_force(xq, xb, 10)
    assert knn_recall(ids, exact) >= 0.9


def test_ivf_search_params_probe_all_lists_is_exact():
    rng = np.random.default_rng(6)
    xb = unit(rng.standard_normal((2000, 32)))
    xq = unit(rng.standard_normal((50, 32)))
    index = EmbeddingIndex(32, "IVF16,Flat", use_gpu=False, search_params="nprobe=16")
    index.add(xb)  # trains on xb first
    _, ids = index.search(xq, 10)
    _, exact = brute_force(xq, xb, 10)
    np.testing.assert_array_equal(ids, exact)


def test_train_samples_at_most_max_train_and_needs_enough_rows():
    rng = np.random.default_rng(7)
    xb = unit(rng.standard_normal((400, 8)))
    index = EmbeddingIndex(8, "IVF16,Flat", use_gpu=False)
    with pytest.raises(ValueError, match="at least 16 training vectors, got 10"):
        index.train(xb, max_train=10)
    with pytest.raises(ValueError, match="at least 16 training vectors, got 15"):
        index.add(xb[:15])
    index.train(xb, max_train=100, seed=1)
    assert index.is_trained and index.ntotal == 0
    pq = EmbeddingIndex(8, "IVF4,PQ4", use_gpu=False)
    with pytest.raises(ValueError, match="at least 256 training vectors"):
        pq.train(xb[:100])


def test_errors():
    index = EmbeddingIndex(4, use_gpu=False)
    with pytest.raises(ValueError, match="empty index"):
        index.search(np.ones((1, 4), np.float32), 1)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        index.add(np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        index.add(np.ones(4, np.float32))
    bad = np.ones((2, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.add(bad)
    assert index.ntotal == 0
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        index.search(np.ones((1, 3), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 4), np.inf, np.float32), 1)
    for k in (0, -1, True):
        with pytest.raises(ValueError, match="k must be"):
            index.search(np.eye(4, dtype=np.float32), k)
    with pytest.raises(ValueError, match="chunk_size"):
        index.search(np.eye(4, dtype=np.float32), 1, chunk_size=0)
    with pytest.raises(ValueError, match="factory"):
        EmbeddingIndex(4, "NotAnIndex")
    with pytest.raises(ValueError, match="dim"):
        EmbeddingIndex(0)
    with pytest.raises(ValueError, match="search_params"):
        EmbeddingIndex(4, "Flat", search_params="nprobe=2")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="gpu_temp_memory"):
            EmbeddingIndex(4, gpu_temp_memory=bad)


def test_gpu_request_without_gpu_raises():
    from retrieval.index.faiss_runtime import gpu_available, import_faiss

    if gpu_available(import_faiss()):
        pytest.skip("faiss sees a GPU")
    for factory in ("Flat", "HNSW32"):
        with pytest.raises(RuntimeError, match="no usable GPU"):
            EmbeddingIndex(4, factory, use_gpu=True)
        assert not EmbeddingIndex(4, factory).on_gpu


def test_missing_faiss_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        EmbeddingIndex(4)


def test_importing_the_package_does_not_import_faiss():
    import subprocess
    import sys

    code = "import sys, retrieval.index; assert 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""Tests of the exact leave-one-out join (exact_self_knn), drop_self and search_self."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from retrieval.evaluation import evaluate_embeddings, search_excluding_self
from retrieval.index import EmbeddingIndex, drop_self, exact_self_knn, self_join_pays_off
from tests.index.synthetic import clustered, unit


def _brute_self_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out top-k in float64, ties by ascending id (a stable sort of -score)."""
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(scores, -np.inf)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, len(x) - 1)]
    return np.take_along_axis(scores, ids, axis=1), ids


def _small_ints(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Integer vectors: every product is exact in float32, so ties are exact ties."""
    x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    x[1::7] = x[0]  # exact duplicates of row 0
    x[3:4] = x[2:3]
    return x


@pytest.mark.parametrize(
    ("n", "k", "block_size"),
    [
        (300, 10, 64),  # several blocks, n not a multiple of the block
        (301, 10, 7),  # blocks smaller than k
        (50, 1, 1),  # k = 1, one row per block
        (12, 20, 5),  # n <= k + 1: every other row
        (11, 10, 4),  # n = k + 1
        (257, 3, 4096),  # one block
        (1500, 10, None),  # the default: blocks of 1024
        (2, 5, 1),
    ],
)
def test_matches_brute_force_with_exact_ties(n: int, k: int, block_size: int | None) -> None:
    x = _small_ints(np.random.default_rng(n + k), n, 4)
    scores, ids = exact_self_knn(x, k, block_size=block_size)
    expected_scores, expected_ids = _brute_self_knn(x, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (n, min(k, n - 1))
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


def test_duplicates_are_results_and_ties_go_by_ascending_id() -> None:
    x = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    scores, ids = exact_self_knn(x, 3, block_size=2)
    np.testing.assert_array_equal(ids, [[1, 3, 2], [0, 3, 2], [4, 0, 1], [0, 1, 2], [2, 0, 1]])
    np.testing.assert_array_equal(scores[:, 0], 1.0)


def test_unit_vectors_match_brute_force() -> None:
    x = unit(np.random.default_rng(0).standard_normal((700, 24)))
    scores, ids = exact_self_knn(x, 10, block_size=128)
    expected_scores, expected_ids = _brute_self_knn(x, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_block_size_does_not_change_results() -> None:
    x = _small_ints(np.random.default_rng(1), 97, 5)
    reference = exact_self_knn(x, 6, block_size=97)
    for block_size in (1, 3, 32, 96, 10_000):
        for got, want in zip(exact_self_knn(x, 6, block_size=block_size), reference, strict=True):
            np.testing.assert_array_equal(got, want)


def test_memory_is_bounded_by_the_block_not_n_squared() -> None:
    x = unit(np.random.default_rng(2).standard_normal((2000, 8)))
    exact_self_knn(x[:50], 5, block_size=128)  # warm up lazy imports
    tracemalloc.start()
    exact_self_knn(x, 5, block_size=128)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2000 * 2000 * 4 / 10  # an n x n score matrix would take 16 MB


def test_degenerate_sizes_and_bad_arguments() -> None:
    for n in (0, 1):
        scores, ids = exact_self_knn(np.ones((n, 3), np.float32), 4)
        assert scores.shape == ids.shape == (n, 0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        exact_self_knn(np.ones((3, 2)), 0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        exact_self_knn(np.ones((3, 2)), 1, block_size=0)
    with pytest.raises(ValueError, match="2-D"):
        exact_self_knn(np.ones(3), 1)


def test_drop_self_removes_the_own_id_or_the_last_column() -> None:
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.9, 0.5]], dtype=np.float32)
    ids = np.array([[4, 0, 2], [3, 5, 7]])
    kept_scores, kept_ids = drop_self(scores, ids, np.array([0, 1]))
    np.testing.assert_array_equal(kept_ids, [[4, 2], [3, 5]])
    np.testing.assert_array_equal(kept_scores, scores[[[0, 0], [1, 1]], [[0, 2], [0, 1]]])


def _indexes(x: np.ndarray) -> tuple[EmbeddingIndex, EmbeddingIndex]:
    flat = EmbeddingIndex(x.shape[1], "Flat", use_gpu=False)
    ivf = EmbeddingIndex(x.shape[1], "IVF8,Flat", use_gpu=False, search_params="nprobe=8")
    for index in (flat, ivf):
        index.add(x)
    return flat, ivf


def test_search_self_flat_is_exact_and_ivf_falls_back_to_the_same_neighbours() -> None:
    (x,) = clustered(np.random.default_rng(3), (600,), dim=16)
    flat, ivf = _indexes(x)
    assert flat.exact_on_cpu and not ivf.exact_on_cpu
    expected_scores, expected_ids = _brute_self_knn(x, 7)
    for index in (flat, ivf):
        scores, ids = index.search_self(7, chunk_size=100)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert ivf.remove_ids(np.arange(5)) == 5  # reading the vectors changed nothing
    assert flat.search_self(1000)[1].shape == (600, 599)
    with pytest.raises(ValueError, match="k must be a positive int"):
        flat.search_self(0)
    with pytest.raises(ValueError, match="empty index"):
        EmbeddingIndex(4, use_gpu=False).search_self(1)


def test_the_join_pays_off_for_many_rows_and_few_neighbours() -> None:
    assert self_join_pays_off(60_502, 512, 10) and self_join_pays_off(200_000, 128, 10)
    assert not self_join_pays_off(60_502, 512, 100)
    assert not self_join_pays_off(5_000, 512, 10)


@pytest.fixture
def join_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the evaluation take the join on small test data."""
    monkeypatch.setattr("retrieval.evaluation.gallery_search.self_join_pays_off", lambda *_: True)


@pytest.mark.usefixtures("join_always")
@pytest.mark.parametrize("share", [1.0, 0.6, 0.3])
def test_search_excluding_self_is_the_same_on_every_path(share: float) -> None:
    (x,) = clustered(np.random.default_rng(4), (500,), dim=16)
    flat, ivf = _indexes(x)
    rows = np.sort(np.random.default_rng(5).permutation(500)[: int(share * 500)])
    expected_scores, expected_ids = _brute_self_knn(x, 9)
    for index in (flat, ivf):  # the join (Flat, share >= 0.5), or search + drop_self
        scores, ids = search_excluding_self(index, x[rows], rows, 9, chunk_size=64)
        np.testing.assert_array_equal(ids, expected_ids[rows])
        np.testing.assert_allclose(scores, expected_scores[rows], atol=1e-5)


@pytest.mark.usefixtures("join_always")
def test_leave_one_out_metrics_agree_between_the_join_and_search() -> None:
    (x,) = clustered(np.random.default_rng(6), (400,), dim=16)
    labels = np.random.default_rng(7).integers(0, 40, 400)
    joined = evaluate_embeddings(x, labels, ks=(1, 4), keep_neighbors=5)
    searched = evaluate_embeddings(x, labels, ks=(1, 4), factory="IVF1,Flat", keep_neighbors=5)
    assert joined.metrics == pytest.approx(searched.metrics, abs=1e-12)
    np.testing.assert_array_equal(joined.neighbor_ids, searched.neighbor_ids)

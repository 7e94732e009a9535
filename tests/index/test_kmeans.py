"""kmeans: deterministic cluster assignments that recover well-separated clusters."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import kmeans


def _blobs(seed: int, k: int = 8, per: int = 50, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = 10 * rng.standard_normal((k, dim))
    y = np.repeat(np.arange(k), per)
    return (centres[y] + 0.5 * rng.standard_normal((k * per, dim))).astype(np.float32), y


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the labelings a and b split the rows identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_well_separated_clusters(seed):
    x, y = _blobs(seed)
    labels = kmeans(x, 8, seed=seed)
    assert labels.dtype == np.int64 and labels.shape == (400,)
    assert labels.min() >= 0 and labels.max() < 8
    assert _same_partition(labels, y)


def test_deterministic_for_a_seed_and_subsampling():
    x, _ = _blobs(3, k=20, per=40)
    a = kmeans(x, 20, seed=5, max_points_per_centroid=10)  # trains on 200 of the 800 rows
    np.testing.assert_array_equal(a, kmeans(x, 20, seed=5, max_points_per_centroid=10))
    np.testing.assert_array_equal(
        kmeans(x, 20, seed=1, init="random"), kmeans(x, 20, seed=1, init="random")
    )


def test_edge_cases_and_errors():
    x, _ = _blobs(4, k=3, per=4)
    assert _same_partition(kmeans(x, 12), np.arange(12))  # k == n: one row per cluster
    np.testing.assert_array_equal(kmeans(x, 1), np.zeros(12, dtype=np.int64))
    assert kmeans(x.astype(np.float64), 3).dtype == np.int64
    for bad_k in (0, 13, True):
        with pytest.raises(ValueError, match="k must be"):
            kmeans(x, bad_k)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(x[0], 1)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(x[:0], 1)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 2)
    with pytest.raises(ValueError, match="niter"):
        kmeans(x, 2, niter=0)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, init="kmeans++")

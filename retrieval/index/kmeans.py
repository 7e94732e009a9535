"""k-means clustering of embeddings with faiss (used by the NMI metric)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from retrieval.index.faiss_runtime import import_faiss
from retrieval.infra.checks import checked_vectors, positive_int

__all__ = ["kmeans"]


def kmeans(
    x: np.ndarray,
    k: int,
    seed: int = 0,
    niter: int = 20,
    max_points_per_centroid: int = 256,
    init: str = "k-means++",
) -> np.ndarray:
    """Cluster the rows of ``x`` into ``k`` groups with ``faiss.Kmeans`` (Euclidean, CPU).

    Centroids are not projected on the unit sphere (``spherical=False``). The result is
    deterministic for a given ``seed`` on a given machine (faiss's initial centroids and
    subsample are seeded). k-means++ is the default: faiss's random initialisation often
    merges well-separated clusters.

    Args:
        x: (n, d) real array, converted to C-contiguous float32; n >= 1.
        k: number of clusters, ``1 <= k <= n``.
        seed: seed of faiss's initialisation and subsampling.
        niter: k-means iterations, >= 1.
        max_points_per_centroid: centroids are trained on at most ``k *`` this many rows,
            drawn with ``seed``; every row is then assigned to its nearest centroid.
        init: ``"k-means++"`` or ``"random"`` (k random rows); a faiss without k-means++
            falls back to random, with a warning.

    Returns:
        (n,) int64 cluster of each row, in ``[0, k)``.

    Raises:
        ValueError: ``x`` not 2-D, empty or non-finite; ``k`` not in ``[1, n]``; ``niter``
            or ``max_points_per_centroid`` < 1; an unknown ``init``.
    """
    xs = checked_vectors(x, "x", empty=False)
    n, d = xs.shape
    k = positive_int(k, "k")
    if k > n:
        raise ValueError(f"k must be <= the number of rows ({n}), got {k}")
    niter = positive_int(niter, "niter")
    max_points_per_centroid = positive_int(max_points_per_centroid, "max_points_per_centroid")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    faiss = import_faiss()
    options = _init_options(faiss, init)
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=int(seed),
        spherical=False,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # few points per cluster is normal here, not a warning
        verbose=False,
        **options,
    )
    km.train(xs)
    _, labels = km.index.search(xs, 1)
    return np.ascontiguousarray(labels[:, 0], dtype=np.int64)


def _init_options(faiss: Any, init: str) -> dict[str, Any]:
    """``faiss.Kmeans``'s option for ``init``; k-means++ falls back to random, with a warning,
    where faiss lacks it."""
    plus_plus = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
    if init != "k-means++":
        return {}
    if plus_plus is None:
        warnings.warn("this faiss has no k-means++; using random initialisation", stacklevel=3)
        return {}
    return {"init_method": plus_plus}

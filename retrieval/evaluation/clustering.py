"""Clustering quality: normalised mutual information of cluster assignments with labels."""

from __future__ import annotations

import numpy as np

__all__ = ["nmi"]


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()  # counts > 0
    return float(-(p * np.log(p)).sum())


def nmi(cluster_ids: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information of a clustering with the labels, in nats.

    ``NMI = MI(C, L) / ((H(C) + H(L)) / 2)``: arithmetic-mean normalisation, the default of
    scikit-learn's ``normalized_mutual_info_score`` (which pytorch-metric-learning's "NMI"
    calls), with its conventions for degenerate inputs: 1.0 when both partitions have a
    single group (or there are no samples), 0.0 when only one of them has a single group or
    when MI is 0. Symmetric in its two arguments; ids are only compared for equality.

    Args: ``cluster_ids`` and ``labels``, (n,) integer arrays. Returns a float in [0, 1].
    Raises ValueError unless both are 1-D integer arrays of the same length.
    """
    c, lab = np.asarray(cluster_ids), np.asarray(labels)
    if c.ndim != 1 or c.shape != lab.shape:
        raise ValueError(f"cluster_ids, labels must be 1-D of one length: {c.shape}, {lab.shape}")
    for name, arr in (("cluster_ids", c), ("labels", lab)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    _, ci, c_counts = np.unique(c, return_inverse=True, return_counts=True)
    _, li, l_counts = np.unique(lab, return_inverse=True, return_counts=True)
    if c_counts.size == l_counts.size <= 1:
        return 1.0
    if c_counts.size == 1 or l_counts.size == 1:
        return 0.0
    pairs = ci.astype(np.int64) * l_counts.size + li
    pair_ids, joint = np.unique(pairs, return_counts=True)
    n = float(c.size)
    outer = c_counts[pair_ids // l_counts.size] * l_counts[pair_ids % l_counts.size]
    mi = float(np.clip((joint / n * np.log(joint * n / outer)).sum(), 0.0, None))
    if mi <= 0.0:
        return 0.0
    return min(1.0, mi / ((_entropy(c_counts) + _entropy(l_counts)) / 2))

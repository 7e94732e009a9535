"""Deterministic synthetic embeddings and a numpy brute-force search for the index tests."""

from __future__ import annotations

import numpy as np


def unit(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` scaled to unit L2 norm, as float32."""
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, sizes: tuple[int, ...], dim: int = 32) -> list[np.ndarray]:
    """Sets of unit vectors around 16 shared random centres (the structure IVF exploits)."""
    c = unit(rng.standard_normal((16, dim)))
    return [unit(c[rng.integers(0, 16, n)] + 0.15 * rng.standard_normal((n, dim))) for n in sizes]


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search in float64: (scores, ids), best first."""
    scores = xq.astype(np.float64) @ xb.astype(np.float64).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids

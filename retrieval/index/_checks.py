"""Input validation shared by the index modules: vectors, dimensions, id lists."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_dim(dim: Any) -> int:
    """Validate an embedding dimension: a positive int (not a bool)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return int(dim)


def check_positive(value: Any, name: str) -> int:
    """Validate ``value`` as a positive int (not a bool); return it as int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def sample_rows(x: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """At most ``max_rows`` rows of ``x``, drawn without replacement in their original order.

    Deterministic for a ``seed`` (``numpy.random.default_rng``); ``x`` itself when it is
    short enough. Raises ValueError when ``max_rows < 1``.
    """
    if max_rows < 1:
        raise ValueError(f"max_train must be >= 1, got {max_rows}")
    if x.shape[0] <= max_rows:
        return x
    rows = np.random.default_rng(seed).choice(x.shape[0], size=max_rows, replace=False)
    return x[np.sort(rows)]


def as_vectors(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Validate ``x`` as an (n, dim) array of finite reals; return it as C-contiguous float32."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values (after conversion to float32)")
    return arr


def as_ids(ids: Any, ntotal: int) -> np.ndarray:
    """Validate ``ids`` as a 1-D integer array of ids in ``[0, ntotal)``.

    Returns:
        The distinct ids, sorted, as C-contiguous int64 (duplicates count once).
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= ntotal:
        raise ValueError(
            f"ids must lie in [0, {ntotal}) (the index holds {ntotal} vectors), "
            f"got ids from {arr.min()} to {arr.max()}"
        )
    return np.ascontiguousarray(np.unique(arr), dtype=np.int64)

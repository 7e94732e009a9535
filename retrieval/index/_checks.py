"""What the index modules share beyond :mod:`retrieval.infra.checks`: id lists and the
training sample's rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval.infra.checks import positive_int


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


def sample_positions(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a training sample of ``n`` rows: all of ``0 .. n-1`` when
    ``n <= max_rows``, else ``max_rows`` of them drawn without replacement by
    ``numpy.random.default_rng(seed)``. Every training sample in the package is drawn so.

    >>> sample_positions(3, 5).tolist()
    [0, 1, 2]
    """
    positive_int(max_rows, "max_rows")
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))

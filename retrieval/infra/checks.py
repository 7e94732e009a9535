"""Argument checks shared by every package, each rule worded once.

>>> positive_int(3, "k")
3
>>> positive_int(True, "k")
Traceback (most recent call last):
ValueError: k must be a positive integer, got True
>>> checked_vectors([[1, 0], [0, 1]], "xb", dim=2).dtype
dtype('float32')
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["checked_vectors", "error_line", "int_array", "is_int", "positive_int", "unit_rows"]


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str, *, maximum: int | None = None) -> int:
    """``value`` as an int when it is an integer >= 1 (and <= ``maximum`` if given).

    Raises:
        ValueError: ``"{name} must be a positive integer, got {value!r}"`` (or ``"... an
            integer from 1 to {maximum}"``).
    """
    if not is_int(value) or value < 1 or (maximum is not None and value > maximum):
        rule = "a positive integer" if maximum is None else f"an integer from 1 to {maximum}"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def checked_vectors(
    x: Any,
    name: str,
    *,
    dim: int | None = None,
    rows: int | None = None,
    integers: bool = True,
    empty: bool = True,
) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array of finite numbers.

    Args:
        dim: the width ``d`` it must have (any when None).
        rows: the row count ``n`` it must have (any when None).
        integers: whether integer arrays are accepted (converted to float32); when False only
            floating-point arrays are.
        empty: whether an array with no rows or no columns is accepted.

    Raises:
        ValueError: naming ``name`` and the shape, dtype or value that is wrong.
    """
    arr = np.asarray(x)
    if (
        arr.ndim != 2
        or (dim is not None and arr.shape[1] != dim)
        or (rows is not None and arr.shape[0] != rows)
    ):
        want = f"({'n' if rows is None else rows}, {'d' if dim is None else dim})"
        raise ValueError(f"{name} must be a 2-D float array of shape {want}, got {arr.shape}")
    if not empty and 0 in arr.shape:
        raise ValueError(f"{name} is empty: need a non-empty 2-D array, got shape {arr.shape}")
    if not (
        np.issubdtype(arr.dtype, np.floating) or integers and np.issubdtype(arr.dtype, np.integer)
    ):
        kind = "hold real numbers" if integers else "be a 2-D float (floating-point) array"
        raise ValueError(f"{name} must {kind}, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # a value too large for float32 is reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values (as float32)")
    return arr


def unit_rows(x: np.ndarray, name: str, tolerance: float) -> np.ndarray:
    """``x`` itself when every row has L2 norm 1 within ``tolerance``.

    Raises:
        ValueError: naming the first row that is not, its norm and how many such rows there are.
    """
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > tolerance)
    if bad.size:
        raise ValueError(
            f"{name} must be L2-normalised; row {bad[0]} has norm {norms[bad[0]]:.4f} "
            f"({bad.size} such rows): divide each row by its norm first"
        )
    return x


def int_array(x: Any, n: int, name: str) -> np.ndarray:
    """``x`` as an int64 array of shape (n,).

    Raises:
        ValueError: ``"{name} must be an integer array of shape (n,), ..."``.
    """
    arr = np.asarray(x)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer array of shape ({n},), got {arr.dtype} {arr.shape}"
        )
    return arr.astype(np.int64)


def error_line(err: BaseException) -> str:
    """How an expected error (bad input, a missing file) is reported, by the ``retrieval``
    command and by the tasks alike: one ``error: ...`` line, a KeyError's message without the
    quotes ``str`` puts around it."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return f"error: {text}"

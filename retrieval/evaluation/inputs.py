"""Checking and normalising the arrays an evaluation is given."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["as_labels", "encode_labels", "l2_normalised"]

NORM_TOLERANCE = 1e-4


def l2_normalised(arrays: dict[str, np.ndarray], stacklevel: int = 3) -> dict[str, np.ndarray]:
    """Return each (n, d) float32 array with unit rows; warn once if any needed normalising.

    Rows already of unit norm (within 1e-4) are returned untouched, so normalised input is
    searched bit for bit as given.

    Raises:
        ValueError: an array has an all-zero row, which has no direction.
    """
    out: dict[str, np.ndarray] = {}
    changed = []
    for name, x in arrays.items():
        # float32 is ample for a 1e-4 tolerance and needs no float64 copy of a large set
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        if (norms == 0).any():
            raise ValueError(
                f"{name} contains zero vectors (row {int(np.argmin(norms))}), which cannot be "
                "L2-normalised"
            )
        if np.abs(norms - 1.0).max() <= NORM_TOLERANCE:
            out[name] = x
        else:
            out[name] = (x / norms[:, None]).astype(np.float32, copy=False)
            changed.append(name)
    if changed:
        warnings.warn(
            f"{' and '.join(changed)} embeddings are not L2-normalised; normalising them "
            "(float32) for evaluation",
            UserWarning,
            stacklevel=stacklevel,
        )
    return out


def as_labels(labels: object, n: int, name: str) -> np.ndarray:
    """Return ``labels`` as a 1-D array of length ``n`` (object dtype for tuples, mixed kinds)."""
    if isinstance(labels, np.ndarray):
        arr = labels
    else:
        items = list(labels)  # type: ignore[call-overload]
        try:
            arr = np.asarray(items)
        except ValueError:
            arr = np.empty(0)
        if arr.ndim != 1 or arr.shape[0] != len(items):
            arr = np.fromiter(items, dtype=object, count=len(items))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per vector), got {arr.shape}")
    return arr


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary labels to int64 codes 0..L-1 (equal labels <-> equal codes)."""
    try:
        return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    except TypeError:
        codes: dict[object, int] = {}
        return np.array([codes.setdefault(v, len(codes)) for v in labels.tolist()], np.int64)


def encode_pair(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Codes of query and gallery labels in one shared code space; ``1`` never equals ``"1"``."""
    lq, lg = query_labels, gallery_labels
    if lq.dtype.kind != lg.dtype.kind:  # keep 1 and "1" distinct: no cast to str
        lq, lg = lq.astype(object), lg.astype(object)
    codes = encode_labels(np.concatenate([lq, lg]))
    return codes[: len(lq)], codes[len(lq) :]

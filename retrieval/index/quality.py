"""How good an approximate index is, measured against exact search (pure numpy)."""

from __future__ import annotations

import numpy as np

__all__ = ["knn_recall"]

_CHUNK_ELEMENTS = 1 << 22  # bound on the (rows, k_found, k) comparison block


def knn_recall(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Recall@k of an index against exact search: mean over queries of |found ∩ exact| / k.

    ``k`` is ``exact_ids.shape[1]``. Ids are compared as sets per query, so order within a
    row does not matter and a duplicate in ``found_ids`` counts once. Negative ids (faiss's
    -1 for "no result") never match, in either array.

    Args:
        found_ids: (nq, k_found) integer ids returned by the index under test.
        exact_ids: (nq, k) integer ids of the exact top k (e.g. a ``"Flat"`` index); the
            non-negative ids of a row must be distinct.

    Returns:
        Recall in ``[0, 1]``.

    Raises:
        ValueError: non-2-D or non-integer arrays, different numbers of rows, ``nq == 0``,
            ``k == 0``, or a repeated id in a row of ``exact_ids``.
    """
    found, exact = np.asarray(found_ids), np.asarray(exact_ids)
    for name, arr in (("found_ids", found), ("exact_ids", exact)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D (nq, k), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    nq, k = exact.shape
    if found.shape[0] != nq:
        raise ValueError(f"found_ids has {found.shape[0]} rows but exact_ids has {nq}")
    if nq == 0 or k == 0:
        raise ValueError(f"knn_recall needs at least one query and k >= 1, got shape {exact.shape}")
    ordered = np.sort(exact, axis=1)
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
        raise ValueError("exact_ids repeats an id within a row; pass the exact top-k ids")
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, k * found.shape[1]))
    hits = 0
    for start in range(0, nq, rows_per_chunk):
        f = found[start : start + rows_per_chunk, :, None]
        e = exact[start : start + rows_per_chunk, None, :]
        hits += int(((f == e) & (e >= 0)).any(axis=1).sum())
    return hits / (nq * k)

"""Retrieval evaluation of embeddings: Recall@k, MAP@R and R-precision through FAISS search.

Two protocols:

- leave-one-out (``gallery=None``, CUB-200 / Cars-196 / SOP): every item queries all the
  others. The query is removed from its own results by index, never by score, so exact
  duplicates of a query stay in its results as ordinary gallery items.
- query / gallery (In-Shop): queries search a separate gallery.

Queries whose label has no other member in the gallery are excluded from the averages and
counted in ``RetrievalResult.num_excluded`` (as pytorch-metric-learning does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.index import EmbeddingIndex
from retrieval.metrics import map_at_r, r_precision, recall_at_k

__all__ = ["RetrievalResult", "evaluate_embeddings", "search_excluding_self"]

_NORM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class RetrievalResult:
    """Scores of one evaluation.

    Attributes:
        metrics: metric name -> mean over the scored queries, each a finite float in [0, 1];
            keys ``"recall@{k}"``, ``"map@r"``, ``"r_precision"``.
        num_queries: number of queries scored (>= 1).
        num_excluded: number of queries with no relevant gallery item, left out of the means.
    """

    metrics: dict[str, float]
    num_queries: int
    num_excluded: int

    def __post_init__(self) -> None:
        clean: dict[str, float] = {}
        for name, value in dict(self.metrics).items():
            if not isinstance(name, str):
                raise ValueError(f"metric names must be str, got {name!r}")
            v = float(value)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"metric {name!r} must be a finite value in [0, 1], got {v}")
            clean[name] = v
        object.__setattr__(self, "metrics", clean)
        for name in ("num_queries", "num_excluded"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
            object.__setattr__(self, name, int(n))
        if self.num_queries == 0:
            raise ValueError("num_queries must be >= 1")


def _check_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    """Validate a non-empty (n, d) array of finite floats; return it as float32."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _normalise(x: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """Return (unit-norm float32 copy or ``x`` itself, whether ``x`` needed normalising)."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise ValueError(f"{name} contains zero vectors, which cannot be L2-normalised")
    if np.abs(norms - 1.0).max() <= _NORM_TOLERANCE:
        return x, False
    return (x / norms[:, None]).astype(np.float32), True


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    """Return ``labels`` as a 1-D array of length ``n`` (object dtype for tuples, mixed kinds)."""
    if isinstance(labels, np.ndarray):
        arr = labels
    else:
        items = list(labels)
        try:
            arr = np.asarray(items)
        except ValueError:
            arr = np.empty(0)
        if arr.ndim != 1 or arr.shape[0] != len(items):
            arr = np.fromiter(items, dtype=object, count=len(items))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per vector), got {arr.shape}")
    return arr


def _encode_labels(labels: np.ndarray) -> np.ndarray:
    """Map arbitrary labels to int64 codes 0..L-1 (equal labels <-> equal codes)."""
    try:
        return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    except TypeError:
        codes: dict[object, int] = {}
        return np.array([codes.setdefault(v, len(codes)) for v in labels.tolist()], np.int64)


def search_excluding_self(
    index: EmbeddingIndex, xq: np.ndarray, self_ids: np.ndarray, k: int, chunk_size: int = 4096
) -> np.ndarray:
    """Search ``k`` neighbours of queries that are themselves in ``index``, dropping self.

    Searches ``k + 1`` neighbours (clamped to ``index.ntotal``) and removes, per row, the
    column whose id equals the query's own id; if the query's id is not among them (ties
    with exact duplicates can push it out), the last column is removed instead. Duplicates
    of a query therefore remain as ordinary results.

    Args:
        index: index holding the queries, under the ids ``self_ids``.
        xq: (nq, dim) float32 queries.
        self_ids: (nq,) int ids of the queries in ``index``.
        k: neighbours wanted per query, ``1 <= k``; the result has
            ``min(k + 1, ntotal) - 1`` columns.
        chunk_size: queries per FAISS call.

    Returns:
        (nq, min(k + 1, ntotal) - 1) int64 ids, best first; never the query's own id.
    """
    _, ids = index.search(xq, k + 1, chunk_size=chunk_size)
    nq, cols = ids.shape
    is_self = ids == np.asarray(self_ids, dtype=np.int64)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), cols - 1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(nq), drop] = False
    return ids[keep].reshape(nq, cols - 1)


def evaluate_embeddings(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    factory: str = "Flat",
    chunk_size: int = 4096,
) -> RetrievalResult:
    """Evaluate retrieval with Recall@k, MAP@R and R-precision.

    Args:
        query: (nq, dim) float array of finite values. Rows not of unit L2 norm (tolerance
            1e-4) are normalised to float32 with a single warning per call.
        query_labels: (nq,) labels of any kind (ints, strs, hashables); only equality matters.
        gallery: (ng, dim) float array, or ``None`` for leave-one-out within ``query``.
        gallery_labels: (ng,) labels; given exactly when ``gallery`` is.
        ks: cut-offs of Recall@k (see ``metrics.recall_at_k``), positive ints. A k larger
            than the gallery (ng, or nq - 1 in leave-one-out) is clamped to the gallery
            size: recall@k then takes the whole gallery as the top k.
        factory: FAISS factory string for ``EmbeddingIndex``; ``"Flat"`` is exact.
        chunk_size: queries per FAISS call.

    Returns:
        RetrievalResult with ``recall@{k}`` for each k, ``map@r`` and ``r_precision``,
        averaged over the queries that have at least one relevant gallery item.

    Raises:
        ValueError: non-2-D, non-float, empty or non-finite embeddings; dimension or label
            length mismatch; only one of gallery / gallery_labels given; bad ks; zero
            vectors; or no query with a relevant gallery item.
    """
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("pass gallery and gallery_labels together, or neither")
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of ints, got {ks!r}")
    if min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks!r}")

    xq = _check_embeddings(query, "query")
    lq = _check_labels(query_labels, xq.shape[0], "query_labels")
    leave_one_out = gallery is None
    if gallery is None or gallery_labels is None:
        xg, lg = xq, lq
    else:
        xg = _check_embeddings(gallery, "gallery")
        if xg.shape[1] != xq.shape[1]:
            raise ValueError(f"query has dim {xq.shape[1]} but gallery has dim {xg.shape[1]}")
        lg = _check_labels(gallery_labels, xg.shape[0], "gallery_labels")

    xq, q_changed = _normalise(xq, "query")
    g_changed = False
    if leave_one_out:
        xg = xq
    else:
        xg, g_changed = _normalise(xg, "gallery")
    if q_changed or g_changed:
        warnings.warn(
            "embeddings are not L2-normalised; normalising them (float32) for evaluation",
            UserWarning,
            stacklevel=2,
        )

    nq, ng = xq.shape[0], xg.shape[0]
    if leave_one_out:
        cq = cg = _encode_labels(lq)
    else:
        if lq.dtype.kind != lg.dtype.kind:  # keep 1 and "1" distinct: no cast to str
            lq, lg = lq.astype(object), lg.astype(object)
        codes = _encode_labels(np.concatenate([lq, lg]))
        cq, cg = codes[:nq], codes[nq:]
    counts = np.bincount(cg, minlength=int(cq.max()) + 1)
    num_relevant = counts[cq] - (1 if leave_one_out else 0)
    scored = np.flatnonzero(num_relevant > 0)
    if scored.size == 0:
        raise ValueError("no query has a relevant gallery item (every query label is lone)")
    r = num_relevant[scored]
    gallery_size = ng - 1 if leave_one_out else ng
    k_needed = min(max(max(ks), int(r.max())), gallery_size)

    index = EmbeddingIndex(xg.shape[1], factory=factory)
    index.add(xg)
    if leave_one_out:
        ids = search_excluding_self(index, xq[scored], scored, k_needed, chunk_size)
    else:
        _, ids = index.search(xq[scored], k_needed, chunk_size=chunk_size)
    neighbor_labels = np.where(ids >= 0, cg[np.clip(ids, 0, None)], -1)
    labels = cq[scored]

    metrics: dict[str, float] = {}
    for k in ks:
        hits = recall_at_k(neighbor_labels, labels, min(k, k_needed))
        metrics[f"recall@{k}"] = float(hits.mean())
    metrics["map@r"] = float(map_at_r(neighbor_labels, labels, r).mean())
    metrics["r_precision"] = float(r_precision(neighbor_labels, labels, r).mean())
    return RetrievalResult(
        metrics=metrics, num_queries=int(scored.size), num_excluded=int(nq - scored.size)
    )


def evaluate_protocol(
    embeddings: np.ndarray,
    labels: np.ndarray,
    is_query: np.ndarray,
    is_gallery: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8),
) -> RetrievalResult:
    """Evaluate one split with its protocol read from the manifest flags.

    Every row both query and gallery (no flags, as in CUB, Cars196, SOP): leave-one-out.
    Otherwise (In-Shop): rows with ``is_query`` search the rows with ``is_gallery``; a row that
    is both would find itself, so that mix is rejected.
    """
    is_query, is_gallery = np.asarray(is_query, bool), np.asarray(is_gallery, bool)
    if is_query.all() and is_gallery.all():
        return evaluate_embeddings(embeddings, labels, ks=ks)
    if (is_query & is_gallery).any():
        raise ValueError(
            "some rows are both query and gallery while others are not: mark each "
            "row of a query/gallery split as exactly one of them"
        )
    return evaluate_embeddings(
        embeddings[is_query], labels[is_query], embeddings[is_gallery], labels[is_gallery], ks=ks
    )

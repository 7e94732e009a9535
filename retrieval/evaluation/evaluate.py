"""Retrieval evaluation of embeddings through the one :class:`~retrieval.index.EmbeddingIndex`.

Two protocols:

- leave-one-out (``gallery=None``, CUB-200 / Cars-196 / SOP): every item queries all the
  others. The query is removed from its own results by index, never by score, so exact
  duplicates of a query stay in its results as ordinary gallery items.
- query / gallery (In-Shop): queries search a separate gallery.

Queries whose label has no other member in the gallery are excluded from the averages and
counted in ``RetrievalResult.num_excluded`` (as pytorch-metric-learning does). R is the number
of relevant gallery items of a query.

The metrics (defined in :mod:`retrieval.evaluation.metrics`):

- ``recall@{k}``: a relevant item among the first k (the papers' Recall@k, a hit rate);
- ``precision@{k}``: the share of the first k that is relevant;
- ``map@{k}``: average precision over the first k, divided by min(k, R);
- ``map@r``: MAP@R (Musgrave et al. 2020); ``r_precision``: precision of the first R;
- ``map``: full mean average precision over the whole exact ranking;
- ``micro_ap@{k}``: µAP (DISC2021): the first k results of all queries ranked together by
  score, area under that precision-recall curve, over ``sum R`` positives. It is the one
  metric that also counts the queries with no relevant gallery item (left out of the means):
  their results are searched too and can only add false positives;
- ``nmi``: normalised mutual information of k-means clusters of the queries (k = number of
  query labels) with their labels.

``map`` and ``nmi`` never depend on the FAISS index searched.

Memory stays bounded on large galleries: the index is searched in chunks of queries keeping
only the first ``K = max(max(ks), max R)`` results per query, and full mAP counts ranks chunk
by chunk; no query x gallery matrix is ever held.

Checking and normalising the arrays an evaluation is given.

The value object an evaluation returns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.evaluation.gallery_search import apply_vector_steps, search_gallery
from retrieval.evaluation.metrics import (
    average_precision,
    micro_ap_at_k,
    nmi,
    per_query_metrics,
    reranked_ranks,
)
from retrieval.evaluation.ranking import relevant_ranks
from retrieval.index import kmeans, knn_recall
from retrieval.infra.checks import checked_vectors, positive_int
from retrieval.postprocess import Postprocess, Whitening

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "RetrievalResult",
    "as_labels",
    "encode_labels",
    "evaluate_embeddings",
    "evaluate_protocol",
    "l2_normalised",
]


#: Metric families: ``recall``, ``precision``, ``map@k`` and ``micro_ap`` give one value per k.
ALL_METRICS = ("recall", "precision", "map@k", "map@r", "r_precision", "map", "micro_ap", "nmi")


#: NMI is left out by default: its k-means costs more than everything else together.
DEFAULT_METRICS = ("recall", "precision", "map@k", "map@r", "r_precision", "map")


def _check_options(ks: Sequence[int], metrics: Sequence[str]) -> tuple[list[int], list[str]]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks must be a non-empty sequence of positive integers, got []")
    ks = [positive_int(k, "each of ks") for k in ks]
    names = list(metrics)
    unknown = sorted(set(names) - set(ALL_METRICS))
    if unknown or not names:
        raise ValueError(f"metrics must be a non-empty subset of {ALL_METRICS}, got {names!r}")
    return sorted(set(int(k) for k in ks)), names


def evaluate_embeddings(
    query: np.ndarray,
    query_labels: np.ndarray | Sequence[object],
    gallery: np.ndarray | None = None,
    gallery_labels: np.ndarray | Sequence[object] | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = DEFAULT_METRICS,
    factory: str = "Flat",
    search_params: str = "",
    compare_exact: bool = True,
    keep_neighbors: int = 0,
    chunk_size: int = 4096,
    seed: int = 0,
    postprocess: Postprocess | None = None,
    whitening: Whitening | None = None,
    background: np.ndarray | None = None,
) -> RetrievalResult:
    """Evaluate retrieval of ``query`` in ``gallery`` (or leave-one-out within ``query``): the
    ``metrics`` (of :data:`ALL_METRICS`, defined in the module docstring) averaged over the
    scored queries, at the cut-offs ``ks`` (clamped to the gallery size).

    Embeddings are (n, dim) finite floats (normalised when not unit rows); labels of any kind.
    ``factory``: the FAISS index searched; with another than ``Flat``, ``compare_exact`` adds
    ``exact_metrics`` and ``knn_recall@{k}``. ``postprocess``: the search-time steps around
    the search, with the ``whitening`` fitted on the training split (when ``fit_on=train``)
    and the training split's ``background`` that ``score_norm`` needs.

    Raises:
        ValueError: bad embeddings, labels, ks, metric names or factory, or no query with a
            relevant gallery item.
    """
    ks_, names = _check_options(ks, metrics)
    space = _Space.of(query, query_labels, gallery, gallery_labels)
    steps = postprocess if postprocess else None
    plan = _Plan.of(space, ks_, steps, chunk_size, space.apply_steps(steps, whitening, background))
    scores, ids, index, final_queries = plan.search(plan.scored, factory, search_params)
    per_query = per_query_metrics(ids, space.cg, plan.labels, plan.r, ks_, names)
    if "map" in names:
        per_query["map"] = plan.full_map(final_queries, ids, steps)
    means = {name: float(v.mean()) for name, v in per_query.items()}
    if "micro_ap" in names:
        means.update(plan.micro_ap(scores, ids, ks_, factory, search_params))
    if "nmi" in names:
        means["nmi"] = nmi(kmeans(space.xq, k=int(np.unique(space.cq).size), seed=seed), space.cq)
    info = _index_info(index, factory, search_params, steps)
    exact_metrics = None
    if factory != "Flat" and compare_exact:
        exact_metrics = plan.exact_metrics(ids, ks_, names, means, info)
    keep = min(keep_neighbors, ids.shape[1])
    return RetrievalResult(
        metrics=means,
        num_queries=int(plan.scored.size),
        num_excluded=int(space.xq.shape[0] - plan.scored.size),
        exact_metrics=exact_metrics,
        index=info,
        query_rows=plan.scored,
        per_query=per_query,
        neighbor_ids=ids[:, :keep],
        neighbor_scores=scores[:, :keep],
    )


def _index_info(
    index: Any, factory: str, search_params: str, steps: Postprocess | None
) -> dict[str, object]:
    """What a result records of the index searched (and the search-time steps)."""
    info: dict[str, object] = {"factory": factory, "search_params": search_params}
    info["bytes_per_vector"] = float(index.bytes_per_vector)
    if steps is not None:
        info["postprocess"] = steps.to_dict()
    return info


@dataclass
class _Space:
    """Unit query and gallery vectors (the same array in leave-one-out) and their labels as
    codes shared by both sides."""

    xq: np.ndarray
    xg: np.ndarray
    cq: np.ndarray
    cg: np.ndarray
    loo: bool

    @classmethod
    def of(
        cls,
        query: np.ndarray,
        query_labels: np.ndarray | Sequence[object],
        gallery: np.ndarray | None,
        gallery_labels: np.ndarray | Sequence[object] | None,
    ) -> _Space:
        if (gallery is None) != (gallery_labels is None):
            raise ValueError("pass gallery and gallery_labels together, or neither")
        xq = checked_vectors(query, "query", integers=False, empty=False)
        lq = as_labels(query_labels, xq.shape[0], "query_labels")
        if gallery is None:
            xq = l2_normalised({"query": xq})["query"]
            cq = encode_labels(lq)
            return cls(xq, xq, cq, cq, True)
        xg = checked_vectors(gallery, "gallery", integers=False, empty=False)
        if xg.shape[1] != xq.shape[1]:
            raise ValueError(f"query has dim {xq.shape[1]} but gallery has dim {xg.shape[1]}")
        lg = as_labels(gallery_labels, xg.shape[0], "gallery_labels")
        unit = l2_normalised({"query": xq, "gallery": xg})
        cq, cg = encode_pair(lq, lg)
        return cls(unit["query"], unit["gallery"], cq, cg, False)

    def apply_steps(
        self, steps: Postprocess | None, whitening: Whitening | None, bg: np.ndarray | None
    ) -> dict[str, Any]:
        """Apply the vector steps of ``steps`` (whitening, DBA) in place; returns the options
        of :func:`search_gallery` (the steps, whether the queries are stored in the searched
        index, the background in the searched space)."""
        if steps is None:
            return {"steps": None, "queries_stored": True, "background": bg}
        vq, vg, _, bg = apply_vector_steps(
            self.xq, None if self.loo else self.xg, steps, whitening, bg
        )
        stored = True
        if self.loo:
            stored = vg is None
            self.xq, self.xg = vq, (vq if vg is None else vg)
        else:
            assert vg is not None
            self.xq, self.xg = vq, vg
        return {"steps": steps, "queries_stored": stored, "background": bg}


@dataclass
class _Plan:
    """Which queries are scored (those with a relevant gallery item), their R and labels,
    and how deep each search goes (``k``)."""

    space: _Space
    num_relevant: np.ndarray
    scored: np.ndarray
    k: int
    chunk_size: int
    options: dict[str, Any]

    @classmethod
    def of(
        cls,
        space: _Space,
        ks: list[int],
        steps: Postprocess | None,
        chunk_size: int,
        options: dict[str, Any],
    ) -> _Plan:
        cq, cg = space.cq, space.cg
        counts = np.bincount(cg, minlength=int(max(cq.max(), cg.max())) + 1)
        num_relevant = counts[cq] - (1 if space.loo else 0)
        scored = np.flatnonzero(num_relevant > 0)
        if scored.size == 0:
            raise ValueError("no query has a relevant gallery item (every query label is lone)")
        k = max(max(ks), int(num_relevant[scored].max()))
        if steps is not None and steps.rerank is not None:
            k = max(k, steps.rerank.top_n)
        ng = space.xg.shape[0]
        k = min(k, ng - 1 if space.loo else ng)
        return cls(space, num_relevant, scored, k, chunk_size, options)

    @property
    def r(self) -> np.ndarray:
        return self.num_relevant[self.scored]

    @property
    def labels(self) -> np.ndarray:
        return self.space.cq[self.scored]

    def search(self, rows: np.ndarray, factory: str, params: str) -> Any:
        """:func:`search_gallery` of the queries ``rows`` (without themselves in
        leave-one-out)."""
        sp = self.space
        self_ids = rows if sp.loo else None
        return search_gallery(
            sp.xq[rows], sp.xg, self_ids, self.k, factory, params, self.chunk_size, **self.options
        )

    def full_map(self, final_queries: np.ndarray, ids: np.ndarray, steps: Any) -> np.ndarray:
        """Per-query full mAP over the exact ranking of the whole gallery, counted one
        (chunk, ng) float32 score block at a time (at most 256 MB)."""
        sp = self.space
        rank_chunk = max(1, min(self.chunk_size, (256 << 20) // (4 * sp.xg.shape[0])))
        self_ids = self.scored if sp.loo else None
        ranks, _ = relevant_ranks(
            final_queries, sp.xg, self.labels, sp.cg, self_ids=self_ids, chunk_size=rank_chunk
        )
        if steps is not None and steps.rerank is not None:
            ranks = reranked_ranks(ranks, ids, sp.cg, self.labels, self.r)
        return average_precision(ranks, self.r)

    def exact_metrics(
        self,
        ids: np.ndarray,
        ks: list[int],
        names: list[str],
        means: dict[str, float],
        info: dict[str, object],
    ) -> dict[str, float]:
        """The metrics of an exact (``Flat``) search of the same queries, beside those of an
        approximate index (``map`` and ``nmi`` do not depend on the index: taken from
        ``means``); adds the approximate index's ``knn_recall@{k}`` to ``info``."""
        sp = self.space
        scores, exact_ids, _, _ = self.search(self.scored, "Flat", "")
        per_query = per_query_metrics(exact_ids, sp.cg, self.labels, self.r, ks, names)
        for k in ks:
            kk = min(k, self.k)
            info[f"knn_recall@{k}"] = knn_recall(ids[:, :kk], exact_ids[:, :kk])
        out = {name: float(v.mean()) for name, v in per_query.items()}
        if "map" in means:
            out["map"] = means["map"]
        if "micro_ap" in names:
            out.update(self.micro_ap(scores, exact_ids, ks, "Flat", ""))
        if "nmi" in means:
            out["nmi"] = means["nmi"]
        return out

    def micro_ap(
        self, scores: np.ndarray, ids: np.ndarray, ks: list[int], factory: str, params: str
    ) -> dict[str, float]:
        """µAP@k of the scored queries' results, with the lone queries' results (searched
        with the same index) counted as false positives."""
        lone = np.flatnonzero(self.num_relevant <= 0)
        lone_scores = self.search(lone, factory, params)[0] if lone.size else None
        positives = int(self.r.sum())
        return micro_ap_at_k(scores, ids, self.space.cg, self.labels, positives, ks, lone_scores)


def evaluate_protocol(
    embeddings: np.ndarray,
    labels: np.ndarray,
    is_query: np.ndarray,
    is_gallery: np.ndarray,
    **options: object,
) -> tuple[RetrievalResult, np.ndarray, np.ndarray]:
    """Evaluate one split with its protocol read from the manifest flags.

    Every row both query and gallery (no flags, as in CUB, Cars196, SOP): leave-one-out.
    Otherwise (In-Shop): rows with ``is_query`` search the rows with ``is_gallery``; a row that
    is both would find itself, so that mix is rejected. ``options`` go to
    :func:`evaluate_embeddings`.

    Returns:
        ``(result, query_rows, gallery_rows)``: the result, and the positions in
        ``embeddings`` of the query set and of the gallery set (``result.query_rows`` and
        ``result.neighbor_ids`` index into these).
    """
    is_query, is_gallery = np.asarray(is_query, bool), np.asarray(is_gallery, bool)
    everything = np.arange(len(labels))
    if is_query.all() and is_gallery.all():
        return evaluate_embeddings(embeddings, labels, **options), everything, everything  # type: ignore[arg-type]
    if (is_query & is_gallery).any():
        raise ValueError(
            "some rows are both query and gallery while others are not: mark each "
            "row of a query/gallery split as exactly one of them"
        )
    q, g = everything[is_query], everything[is_gallery]
    result = evaluate_embeddings(
        embeddings[q],
        labels[q],
        embeddings[g],
        labels[g],
        **options,  # type: ignore[arg-type]
    )
    return result, q, g


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


def _checked_metrics(metrics: Mapping[str, Any], what: str) -> dict[str, float]:
    clean: dict[str, float] = {}
    for name, value in dict(metrics).items():
        if not isinstance(name, str):
            raise ValueError(f"{what} names must be str, got {name!r}")
        v = float(value)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{what} {name!r} must be a finite value in [0, 1], got {v}")
        clean[name] = v
    return clean


@dataclass(frozen=True)
class RetrievalResult:
    """Scores of one evaluation.

    Attributes:
        metrics: metric name -> mean over the scored queries, each a finite float in [0, 1]
            (``recall@{k}``, ``precision@{k}``, ``map@{k}``, ``map@r``, ``r_precision``,
            ``map``, ``nmi``, and ``micro_ap@{k}``, pooled over all queries including those
            left out; see :func:`retrieval.evaluation.evaluate_embeddings`). With an
            approximate index these are the values through that index; with search-time
            steps, the values of the search with them.
        num_queries: number of queries scored (>= 1).
        num_excluded: number of queries with no relevant gallery item, left out of the means.
        exact_metrics: with an approximate index, the same metrics through exact search;
            ``None`` when the search was exact.
        index: how the search was done: ``factory``, ``search_params``, ``bytes_per_vector``,
            with an approximate index ``knn_recall@{k}`` (the share of the exact top k that
            the index finds), and with search-time steps ``postprocess`` (their settings).
        query_rows: (num_queries,) positions, in the query set, of the scored queries.
        per_query: metric name -> (num_queries,) per-query values (no ``nmi``: it is a
            property of the whole set).
        neighbor_ids: (num_queries, n) gallery positions of each scored query's first results
            through the index, best first (-1 where the index found none).
        neighbor_scores: (num_queries, n) their inner-product scores (re-ranking scores
            when the steps re-rank).
    """

    metrics: dict[str, float]
    num_queries: int
    num_excluded: int
    exact_metrics: dict[str, float] | None = None
    index: dict[str, Any] = field(default_factory=dict)
    query_rows: np.ndarray | None = field(default=None, compare=False, repr=False)
    per_query: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    neighbor_ids: np.ndarray | None = field(default=None, compare=False, repr=False)
    neighbor_scores: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _checked_metrics(self.metrics, "metric"))
        if self.exact_metrics is not None:
            exact = _checked_metrics(self.exact_metrics, "exact metric")
            object.__setattr__(self, "exact_metrics", exact)
        for name in ("num_queries", "num_excluded"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
            object.__setattr__(self, name, int(n))
        if self.num_queries == 0:
            raise ValueError("num_queries must be >= 1")
        for name, values in self.per_query.items():
            if np.shape(values) != (self.num_queries,):
                raise ValueError(
                    f"per_query[{name!r}] must have shape ({self.num_queries},), "
                    f"got {np.shape(values)}"
                )

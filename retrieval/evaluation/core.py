"""Retrieval evaluation of embeddings through the one :class:`~retrieval.index.EmbeddingIndex`.

Two protocols:

- leave-one-out (``gallery=None``, CUB-200 / Cars-196 / SOP): every item queries all the
  others. The query is removed from its own results by index, never by score, so exact
  duplicates of a query stay in its results as ordinary gallery items.
- query / gallery (In-Shop): queries search a separate gallery.

Queries whose label has no other member in the gallery are excluded from the averages and
counted in ``RetrievalResult.num_excluded`` (as pytorch-metric-learning does).

Memory stays bounded on large galleries: the index is searched in chunks of queries keeping
only the first ``K = max(max(ks), max R)`` results per query, and full mAP counts ranks chunk
by chunk; no query x gallery matrix is ever held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.evaluation.ap import average_precision
from retrieval.evaluation.clustering import nmi
from retrieval.evaluation.inputs import (
    as_labels,
    encode_labels,
    encode_pair,
    l2_normalised,
)
from retrieval.evaluation.ranking import relevant_ranks
from retrieval.evaluation.result import RetrievalResult
from retrieval.evaluation.scoring import micro_ap_at_k, per_query_metrics, reranked_ranks
from retrieval.evaluation.search import apply_vector_steps, search_gallery
from retrieval.index import kmeans, knn_recall
from retrieval.infra.checks import positive_int, vectors
from retrieval.postprocess import Postprocess, Whitening

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "evaluate_embeddings",
    "evaluate_protocol",
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
    """Evaluate retrieval of ``query`` in ``gallery`` (or leave-one-out within ``query``).

    Metrics (definitions in :mod:`retrieval.evaluation.metrics`, :mod:`~retrieval.evaluation.ap`
    and :mod:`~retrieval.evaluation.clustering`), averaged over the scored queries:

    - ``recall@{k}``: a relevant item among the first k (the papers' Recall@k, a hit rate);
    - ``precision@{k}``: the share of the first k that is relevant;
    - ``map@{k}``: average precision over the first k, divided by min(k, R);
    - ``map@r``: MAP@R (Musgrave et al. 2020); ``r_precision``: precision of the first R;
    - ``map``: full mean average precision over the whole exact ranking;
    - ``micro_ap@{k}``: µAP (DISC2021): the first k results of all queries ranked together by
      score, area under that precision-recall curve, over ``sum R`` positives. It is the one
      metric that also counts the queries with no relevant gallery item (left out of the
      means): their results are searched too and can only add false positives;
    - ``nmi``: normalised mutual information of k-means clusters of the queries (k = number of
      query labels) with their labels.

    R is the number of relevant gallery items of a query. A k larger than the gallery is
    clamped to the gallery size. ``map`` and ``nmi`` never depend on ``factory``.

    Args:
        query: (nq, dim) floats, finite. Rows not of unit norm are normalised (one warning).
        query_labels: (nq,) labels of any kind; only equality matters (``1 != "1"``).
        gallery: (ng, dim) floats, or ``None`` for leave-one-out within ``query``.
        gallery_labels: (ng,) labels; given exactly when ``gallery`` is.
        ks: cut-offs of the ``@k`` metrics.
        metrics: which of :data:`ALL_METRICS` to compute.
        factory: FAISS factory string of the search index; ``"Flat"`` is exact.
        search_params: FAISS parameters of that index, e.g. ``"nprobe=16"``.
        compare_exact: with an approximate index, also search exactly and report
            ``exact_metrics`` and the index's ``knn_recall@{k}``.
        keep_neighbors: keep this many first results per query in the result (for reports).
        chunk_size: queries per FAISS call and per rank-counting step.
        seed: seed of k-means (``nmi``).
        postprocess: search-time steps (:class:`retrieval.postprocess.Postprocess`):
            whitening of queries and gallery, DBA of the gallery, αQE and re-ranking around
            the search; every metric is then of that search. (TTA belongs to the model that
            computed the embeddings and is not applied here.) With re-ranking, the first
            ``max(K, top_n)`` results are re-ordered and ``map`` counts the positions there.
        whitening: a whitening fitted beforehand (on the training split); required when
            ``postprocess.whiten.fit_on`` is ``train``, otherwise it is fitted on the gallery.
        background: (nb, dim) embeddings of the training split that
            ``postprocess.score_norm`` compares queries with (whitened here like the queries);
            required with that step. It changes the scores only: ``micro_ap`` and the kept
            neighbour scores.

    Raises:
        ValueError: non-2-D, non-float, empty or non-finite embeddings; zero vectors;
            dimension or label length mismatch; only one of gallery / gallery_labels;
            bad ks or metric names; an invalid factory; or no query with a relevant item.
    """
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("pass gallery and gallery_labels together, or neither")
    ks_, names = _check_options(ks, metrics)
    xq = vectors(query, "query", integers=False, empty=False)
    lq = as_labels(query_labels, xq.shape[0], "query_labels")
    loo = gallery is None
    if gallery is None:
        xq = l2_normalised({"query": xq})["query"]
        xg, cq = xq, encode_labels(lq)
        cg = cq
    else:
        xg = vectors(gallery, "gallery", integers=False, empty=False)
        if xg.shape[1] != xq.shape[1]:
            raise ValueError(f"query has dim {xq.shape[1]} but gallery has dim {xg.shape[1]}")
        lg = as_labels(gallery_labels, xg.shape[0], "gallery_labels")
        unit = l2_normalised({"query": xq, "gallery": xg})
        xq, xg = unit["query"], unit["gallery"]
        cq, cg = encode_pair(lq, lg)

    steps = postprocess if postprocess else None
    queries_stored = True
    if steps is not None:
        vq, vg, whitening, background = apply_vector_steps(
            xq, None if loo else xg, steps, whitening, background
        )
        if loo:
            queries_stored = vg is None
            xq, xg = vq, (vq if vg is None else vg)
        else:
            assert vg is not None
            xq, xg = vq, vg
    nq, ng = xq.shape[0], xg.shape[0]
    counts = np.bincount(cg, minlength=int(max(cq.max(), cg.max())) + 1)
    num_relevant = counts[cq] - (1 if loo else 0)
    scored = np.flatnonzero(num_relevant > 0)
    if scored.size == 0:
        raise ValueError("no query has a relevant gallery item (every query label is lone)")
    r = num_relevant[scored]
    labels = cq[scored]
    self_ids = scored if loo else None
    k_needed = max(max(ks_), int(r.max()))
    if steps is not None and steps.rerank is not None:
        k_needed = max(k_needed, steps.rerank.top_n)
    k_needed = min(k_needed, ng - 1 if loo else ng)
    options: dict[str, Any] = {
        "steps": steps,
        "queries_stored": queries_stored,
        "background": background,
    }

    scores, ids, index, final_queries = search_gallery(
        xq[scored], xg, self_ids, k_needed, factory, search_params, chunk_size, **options
    )
    per_query = per_query_metrics(ids, cg, labels, r, ks_, names)
    info: dict[str, object] = {
        "factory": factory,
        "search_params": search_params,
        "bytes_per_vector": float(index.bytes_per_vector),
    }
    if steps is not None:
        info["postprocess"] = steps.to_dict()
    exact_metrics = None
    if factory != "Flat" and compare_exact:
        exact_scores, exact_ids, _, _ = search_gallery(
            xq[scored], xg, self_ids, k_needed, "Flat", "", chunk_size, **options
        )
        exact = per_query_metrics(exact_ids, cg, labels, r, ks_, names)
        for k in ks_:
            kk = min(k, k_needed)
            info[f"knn_recall@{k}"] = knn_recall(ids[:, :kk], exact_ids[:, :kk])
    if "map" in names:
        # one (chunk, ng) float32 score block at a time: at most 256 MB
        rank_chunk = max(1, min(chunk_size, (256 << 20) // (4 * ng)))
        ranks, _ = relevant_ranks(
            final_queries, xg, labels, cg, self_ids=self_ids, chunk_size=rank_chunk
        )
        if steps is not None and steps.rerank is not None:
            ranks = reranked_ranks(ranks, ids, cg, labels, r)
        per_query["map"] = average_precision(ranks, r)
        if factory != "Flat" and compare_exact:
            exact["map"] = per_query["map"]
    means = {name: float(v.mean()) for name, v in per_query.items()}
    if factory != "Flat" and compare_exact:
        exact_metrics = {name: float(v.mean()) for name, v in exact.items()}
    if "micro_ap" in names:
        lone = np.flatnonzero(num_relevant <= 0)
        positives = int(r.sum())

        def lone_scores(name: str, params: str) -> np.ndarray | None:
            if lone.size == 0:
                return None
            lone_self = lone if loo else None
            found = search_gallery(
                xq[lone], xg, lone_self, k_needed, name, params, chunk_size, **options
            )
            return found[0]

        lone_found = lone_scores(factory, search_params)
        means.update(micro_ap_at_k(scores, ids, cg, labels, positives, ks_, lone_found))
        if exact_metrics is not None:
            exact_metrics.update(
                micro_ap_at_k(
                    exact_scores, exact_ids, cg, labels, positives, ks_, lone_scores("Flat", "")
                )
            )
    if "nmi" in names:
        clusters = kmeans(xq, k=int(np.unique(cq).size), seed=seed)
        means["nmi"] = nmi(clusters, cq)
        if exact_metrics is not None:
            exact_metrics["nmi"] = means["nmi"]
    keep = min(keep_neighbors, ids.shape[1])
    return RetrievalResult(
        metrics=means,
        num_queries=int(scored.size),
        num_excluded=int(nq - scored.size),
        exact_metrics=exact_metrics,
        index=info,
        query_rows=scored,
        per_query=per_query,
        neighbor_ids=ids[:, :keep],
        neighbor_scores=scores[:, :keep],
    )


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

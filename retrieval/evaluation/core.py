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

import numpy as np

from retrieval.evaluation.inputs import (
    as_labels,
    encode_labels,
    encode_pair,
    l2_normalised,
)
from retrieval.evaluation.metrics import (
    average_precision,
    map_at_k,
    map_at_r,
    micro_average_precision,
    nmi,
    precision_at_k,
    r_precision,
    recall_at_k,
)
from retrieval.evaluation.ranking import relevant_ranks
from retrieval.evaluation.result import RetrievalResult
from retrieval.index import EmbeddingIndex, drop_self, kmeans, knn_recall, self_join_pays_off
from retrieval.infra.checks import positive_int, vectors
from retrieval.postprocess import Postprocess, Whitening, database_augment, fit_whitening
from retrieval.postprocess.query import search_with_steps

__all__ = [
    "ALL_METRICS",
    "apply_vector_steps",
    "DEFAULT_METRICS",
    "evaluate_embeddings",
    "evaluate_protocol",
    "search_excluding_self",
]

#: Metric families: ``recall``, ``precision``, ``map@k`` and ``micro_ap`` give one value per k.
ALL_METRICS = ("recall", "precision", "map@k", "map@r", "r_precision", "map", "micro_ap", "nmi")
#: NMI is left out by default: its k-means costs more than everything else together.
DEFAULT_METRICS = ("recall", "precision", "map@k", "map@r", "r_precision", "map")


def search_excluding_self(
    index: EmbeddingIndex,
    xq: np.ndarray,
    self_ids: np.ndarray,
    k: int,
    chunk_size: int = 4096,
    queries_stored: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``k`` neighbours of queries that are themselves in ``index``, dropping self.

    Searches ``k + 1`` neighbours (clamped to ``index.ntotal``) and removes, per row, the
    column whose id equals the query's own id; if the query's id is not among them (ties
    with exact duplicates, or an approximate index, can push it out), the last column is
    removed instead (:func:`retrieval.index.drop_self`). Duplicates of a query therefore
    remain as ordinary results.

    When the index is exact and on the CPU (:attr:`EmbeddingIndex.exact_on_cpu`), the
    queries are at least half of it and the join pays off
    (:func:`retrieval.index.self_join_pays_off`: large ``ntotal * dim``, small ``k``),
    every stored vector is searched at once with :meth:`EmbeddingIndex.search_self`
    instead (symmetric blocks: half the flops of searching them all, so less than searching
    the queries) and the rows ``self_ids`` kept; the queries are then the stored vectors
    themselves, and ties are ordered by ascending id.

    Args:
        index: index holding the queries, under the ids ``self_ids``.
        xq: (nq, dim) float32 queries: the vectors stored under ``self_ids``.
        self_ids: (nq,) int ids of the queries in ``index``.
        k: neighbours wanted per query, ``1 <= k``.
        chunk_size: queries per FAISS call.
        queries_stored: ``xq`` are the very vectors stored under ``self_ids``; false when
            the queries were changed after storing (augmented gallery, expanded queries),
            which rules out the self-join.

    Returns:
        ``(D, I)``, each (nq, min(k + 1, ntotal) - 1): scores and int64 ids, best first;
        never the query's own id.
    """
    self_ids = np.asarray(self_ids, dtype=np.int64)
    n = index.ntotal
    if (
        queries_stored
        and index.exact_on_cpu
        and 2 * self_ids.size >= n
        and self_join_pays_off(n, index.dim, k)
    ):
        scores, ids = index.search_self(k, chunk_size=chunk_size)
        return scores[self_ids], ids[self_ids]
    return drop_self(*index.search(xq, k + 1, chunk_size=chunk_size), self_ids)


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


def _per_query(
    ids: np.ndarray,
    gallery_codes: np.ndarray,
    query_codes: np.ndarray,
    num_relevant: np.ndarray,
    ks: list[int],
    metrics: list[str],
) -> dict[str, np.ndarray]:
    """Per-query values of every ranking metric from the (nq, K) ids of the results."""
    labels = np.where(ids >= 0, gallery_codes[np.clip(ids, 0, None)], -1)
    cols = labels.shape[1]
    out: dict[str, np.ndarray] = {}
    # a k past the gallery takes the whole gallery
    if "recall" in metrics:
        out.update({f"recall@{k}": recall_at_k(labels, query_codes, min(k, cols)) for k in ks})
    if "precision" in metrics:
        out.update(
            {f"precision@{k}": precision_at_k(labels, query_codes, min(k, cols)) for k in ks}
        )
    if "map@k" in metrics:
        out.update(
            {f"map@{k}": map_at_k(labels, query_codes, num_relevant, min(k, cols)) for k in ks}
        )
    if "map@r" in metrics:
        out["map@r"] = map_at_r(labels, query_codes, num_relevant)
    if "r_precision" in metrics:
        out["r_precision"] = r_precision(labels, query_codes, num_relevant)
    return out


def _micro_ap(
    scores: np.ndarray,
    ids: np.ndarray,
    gallery_codes: np.ndarray,
    query_codes: np.ndarray,
    num_positives: int,
    ks: list[int],
    lone_scores: np.ndarray | None,
) -> dict[str, float]:
    """``micro_ap@{k}``: µAP of the first k results of every query pooled together, the
    results of queries without a relevant item (``lone_scores``, all misses) included."""
    labels = np.where(ids >= 0, gallery_codes[np.clip(ids, 0, None)], -1)
    relevant = labels == query_codes[:, None]
    scores = np.where(ids >= 0, scores, -np.inf)  # an empty slot is no prediction
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        s, rel = scores[:, :kk], relevant[:, :kk]
        if lone_scores is not None:
            s = np.concatenate([s, lone_scores[:, :kk]])
            rel = np.concatenate([rel, np.zeros((len(lone_scores), kk), bool)])
        out[f"micro_ap@{k}"] = micro_average_precision(s, rel, num_positives)
    return out


def _search(
    xq: np.ndarray,
    xg: np.ndarray,
    self_ids: np.ndarray | None,
    k: int,
    factory: str,
    search_params: str,
    chunk_size: int,
    steps: Postprocess | None = None,
    queries_stored: bool = True,
) -> tuple[np.ndarray, np.ndarray, EmbeddingIndex, np.ndarray]:
    """``(scores, ids, index, final queries)``: ``k`` results of ``xq`` in ``xg`` (without
    self), through the query-time steps (αQE, re-ranking) of ``steps`` when given."""
    index = EmbeddingIndex(xg.shape[1], factory=factory, search_params=search_params)
    index.add(xg)

    def search(x: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        if self_ids is None:
            return index.search(x, want, chunk_size=chunk_size)
        stored = queries_stored and x is xq
        return search_excluding_self(index, x, self_ids, want, chunk_size, stored)

    if steps is None or (steps.aqe is None and steps.rerank is None):
        scores, ids = search(xq, k)
        return scores, ids, index, xq
    scores, ids, final = search_with_steps(
        xq, k, search, lambda found: xg[found], aqe=steps.aqe, rerank=steps.rerank
    )
    return scores, ids, index, final


def _reranked_ranks(
    ranks: np.ndarray,
    ids: np.ndarray,
    gallery_codes: np.ndarray,
    query_codes: np.ndarray,
    num_relevant: np.ndarray,
) -> np.ndarray:
    """Full-ranking positions of the relevant items after re-ranking the first ``ids.shape[1]``
    results: their new positions inside that block, the plain ones after it."""
    block = ids.shape[1]
    out = np.zeros_like(ranks)
    relevant = (ids >= 0) & (gallery_codes[np.clip(ids, 0, None)] == query_codes[:, None])
    for row in range(len(ranks)):
        inside = np.flatnonzero(relevant[row]) + 1
        r = int(num_relevant[row])
        tail = np.sort(ranks[row, :r])[inside.size :]
        tail = np.maximum(tail, block + 1 + np.arange(tail.size))
        out[row, :r] = np.concatenate([inside, tail])
    return out


def apply_vector_steps(
    xq: np.ndarray,
    xg: np.ndarray | None,
    steps: Postprocess,
    whitening: Whitening | None,
) -> tuple[np.ndarray, np.ndarray | None, Whitening | None]:
    """Whitening of queries and gallery, then DBA of the gallery (``xg=None``: leave-one-out,
    the queries are the gallery). Returns ``(queries, gallery or None, whitening used)``;
    in leave-one-out with DBA the gallery comes back augmented and the queries not.

    Raises:
        ValueError: whitening to fit on the training split but none given.
    """
    if steps.whiten is not None:
        if whitening is None:
            if steps.whiten.fit_on != "gallery":
                raise ValueError(
                    "postprocess.whiten.fit_on=train: pass the whitening fitted on the "
                    "training split (whitening=), or fit on the gallery (fit_on=gallery)"
                )
            whitening = fit_whitening(
                xq if xg is None else xg,
                dim=steps.whiten.dim,
                shrinkage=steps.whiten.shrinkage,
                method="pca",
            )
        xq = whitening.apply(xq)
        xg = None if xg is None else whitening.apply(xg)
    if steps.dba is not None:
        xg = database_augment(xq if xg is None else xg, steps.dba.k, steps.dba.alpha)
    return xq, xg, whitening


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
) -> RetrievalResult:
    """Evaluate retrieval of ``query`` in ``gallery`` (or leave-one-out within ``query``).

    Metrics (definitions in :mod:`retrieval.evaluation.metrics`), averaged over the scored queries:

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
        vq, vg, whitening = apply_vector_steps(xq, None if loo else xg, steps, whitening)
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
    options = {"steps": steps, "queries_stored": queries_stored}

    scores, ids, index, final_queries = _search(
        xq[scored], xg, self_ids, k_needed, factory, search_params, chunk_size, **options
    )
    per_query = _per_query(ids, cg, labels, r, ks_, names)
    info: dict[str, object] = {
        "factory": factory,
        "search_params": search_params,
        "bytes_per_vector": float(index.bytes_per_vector),
    }
    if steps is not None:
        info["postprocess"] = steps.to_dict()
    exact_metrics = None
    if factory != "Flat" and compare_exact:
        exact_scores, exact_ids, _, _ = _search(
            xq[scored], xg, self_ids, k_needed, "Flat", "", chunk_size, **options
        )
        exact = _per_query(exact_ids, cg, labels, r, ks_, names)
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
            ranks = _reranked_ranks(ranks, ids, cg, labels, r)
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
            return _search(xq[lone], xg, lone_self, k_needed, name, params, chunk_size, **options)[
                0
            ]

        means.update(
            _micro_ap(scores, ids, cg, labels, positives, ks_, lone_scores(factory, search_params))
        )
        if exact_metrics is not None:
            exact_metrics.update(
                _micro_ap(
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

"""Evaluation of benchmarks whose ground truth lists each query's gallery items by name instead
of giving every image a label: Revisited Oxford/Paris (easy, hard and junk lists, scored by
:mod:`retrieval.evaluation.revisited`) and GLDv2 retrieval (one relevant list per query,
scored by mAP@100).

Queries search the gallery through the one :class:`~retrieval.index.EmbeddingIndex`, with the
search-time steps that change vectors or queries (whitening, DBA, αQE); positions in each
query's full ranking are counted by :func:`retrieval.evaluation.ranking.item_ranks`, so a large
gallery never needs a query x gallery matrix. Equal scores rank by ascending gallery id.
Revisited Oxford/Paris +R1M adds a million distractors to the gallery without holding them:
:mod:`retrieval.evaluation.distractors` counts, one block of them at a time, those scoring
above each listed gallery item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from retrieval.data.manifest import ManifestRow
from retrieval.evaluation.distractors import check_distractor_steps, merge_top, scan_distractors
from retrieval.evaluation.inputs import l2_normalised
from retrieval.evaluation.metrics import map_at_k
from retrieval.evaluation.ranking import item_ranks
from retrieval.evaluation.result import RetrievalResult
from retrieval.evaluation.revisited import KAPPAS, SETUPS, revisited_map, setup_lists
from retrieval.evaluation.search import apply_vector_steps, search_gallery
from retrieval.infra.checks import positive_int, vectors
from retrieval.postprocess import Postprocess, Whitening

__all__ = [
    "evaluate_listed",
    "evaluate_relevant_lists",
    "evaluate_revisited",
    "listed_protocol",
]

IdLists = Sequence[Sequence[int] | np.ndarray]


def _prepared(
    query: np.ndarray,
    gallery: np.ndarray,
    steps: Postprocess | None,
    whitening: Whitening | None,
) -> tuple[np.ndarray, np.ndarray, Postprocess | None, Whitening | None]:
    """Checked, L2-normalised queries and gallery after whitening and DBA, the steps, and the
    whitening applied (fitted here when ``whiten.fit_on=gallery``; None without whitening)."""
    xq = vectors(query, "query", integers=False, empty=False)
    xg = vectors(gallery, "gallery", integers=False, empty=False)
    if xq.shape[1] != xg.shape[1]:
        raise ValueError(f"query has dim {xq.shape[1]} but gallery has dim {xg.shape[1]}")
    unit = l2_normalised({"query": xq, "gallery": xg})
    xq, xg = unit["query"], unit["gallery"]
    chosen = steps if steps else None
    used = None
    if chosen is not None:
        if chosen.rerank is not None or chosen.score_norm is not None:
            raise ValueError(
                "postprocess rerank and score_norm are not part of these benchmarks' "
                "protocols: drop them (whiten, dba and aqe are allowed)"
            )
        vq, vg, used, _ = apply_vector_steps(xq, xg, chosen, whitening)
        assert vg is not None
        xq, xg = vq, vg
    return xq, xg, chosen, used


def _checked_lists(lists: IdLists, nq: int, ng: int, name: str) -> list[np.ndarray]:
    if len(lists) != nq:
        raise ValueError(f"{name} must hold one list per query ({nq}), got {len(lists)}")
    out = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in lists]
    if any(ids.size and (ids.min() < 0 or ids.max() >= ng) for ids in out):
        raise ValueError(f"{name}: every id must be a gallery position in [0, {ng})")
    return out


def _positions(ranks: dict[int, int], ids: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions of ``ids`` (each once) from a gallery id -> 1-based rank map."""
    return np.unique(np.array([ranks[i] - 1 for i in ids.tolist()], dtype=np.int64))


def _setup_scores(
    easy: list[np.ndarray],
    hard: list[np.ndarray],
    junk: list[np.ndarray],
    rank_of: list[dict[int, int]],
    kappas: Sequence[int],
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics of the three setups and each setup's per-query AP, from every listed gallery
    item's 1-based rank (``rank_of[q][gallery id]``)."""
    metrics: dict[str, float] = {}
    per_setup = {}
    for setup in SETUPS:
        pos, bad, counts = [], [], []
        for q in range(len(easy)):
            ok, out = setup_lists(easy[q], hard[q], junk[q], setup)
            pos.append(_positions(rank_of[q], ok))
            bad.append(_positions(rank_of[q], out))
            counts.append(int(ok.size))
        result = revisited_map(pos, bad, counts, kappas)
        per_setup[setup] = result.aps
        if result.scored.any():
            metrics[f"map_{setup}"] = result.map
            for k, value in zip(result.kappas, result.mp.tolist(), strict=True):
                metrics[f"mp_{setup}@{k}"] = value
    return metrics, per_setup


def _with_distractors(
    xq: np.ndarray,
    xg: np.ndarray,
    listed: list[np.ndarray],
    found: list[np.ndarray],
    top: tuple[np.ndarray, np.ndarray],
    distractors: Iterable[np.ndarray],
    options: dict[str, Any],
) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray], int]:
    """Ranks of the listed items and the first ``options["keep"]`` results once the
    distractors are appended to the gallery (ids ``ng ...``), read one block at a time; and
    how many distractors there were."""
    steps, whitening, keep = options["steps"], options["whitening"], options["keep"]
    chunk = max(1, min(int(options["chunk_size"]), 512))
    targets: list[np.ndarray] = []  # the listed items' scores, the products item_ranks uses
    for start in range(0, xq.shape[0], chunk):
        block = torch.mm(torch.from_numpy(xq[start : start + chunk]), torch.from_numpy(xg).T)
        chosen = listed[start : start + chunk]
        targets += [row[items] for row, items in zip(block.numpy(), chosen, strict=True)]
    scan = scan_distractors(
        xq,
        targets,
        distractors,
        keep=keep,
        chunk_size=chunk,
        dim=options["dim"],
        transform=whitening.apply if steps is not None and steps.whiten is not None else None,
    )
    ranks = [f + a for f, a in zip(found, scan.above, strict=True)]
    ng = xg.shape[0]
    moved = np.where(scan.top_ids >= 0, scan.top_ids + ng, -1)
    merged = merge_top([top[0], scan.top_scores], [top[1], moved], min(keep, ng + scan.count))
    return ranks, merged, scan.count


def evaluate_revisited(
    query: np.ndarray,
    gallery: np.ndarray,
    easy: IdLists,
    hard: IdLists,
    junk: IdLists,
    kappas: Sequence[int] = KAPPAS,
    keep_neighbors: int = 0,
    chunk_size: int = 4096,
    postprocess: Postprocess | None = None,
    whitening: Whitening | None = None,
    distractors: Iterable[np.ndarray] | None = None,
) -> RetrievalResult:
    """Revisited Oxford/Paris scores of ``query`` searching ``gallery`` (and ``distractors``).

    Metrics (each in [0, 1]; the papers print them x 100): ``map_{setup}`` and
    ``mp_{setup}@{k}`` for setup easy, medium and hard (rules in
    :mod:`retrieval.evaluation.revisited`). A setup in which no query has a positive has no
    metrics. ``num_queries`` counts the queries with a positive in the medium setup (easy or
    hard items); ``per_query`` holds their AP per setup (NaN where a setup leaves one out).
    With ``distractors``, ``index["distractors"]`` is their count.

    Args:
        query: (nq, d) floats (the cropped queries' embeddings).
        gallery: (ng, d) floats.
        easy, hard, junk: per query, gallery positions (0-based) of its ground truth.
        kappas: the k of mP@k.
        keep_neighbors: keep this many first results per query (for reports).
        chunk_size: queries per search call and per rank-counting block.
        postprocess: whitening, DBA and αQE are applied as in every evaluation; re-ranking
            and score normalisation are refused; with distractors, so are DBA and αQE.
        whitening: a whitening fitted beforehand (``postprocess.whiten.fit_on=train``).
        distractors: blocks of (n_i, d) vectors of images relevant to no query (R1M), read
            once, one block at a time (:mod:`retrieval.evaluation.distractors`); they rank as
            gallery ids ``ng, ng + 1, ...`` in block order, after every gallery item on equal
            scores. The whitening applies to them too (fitted on ``gallery`` alone when
            ``fit_on=gallery``). First results among them have ids >= ng.

    Raises:
        ValueError: bad embeddings, lists or distractor blocks, DBA or αQE with distractors,
            or no query with any positive.
    """
    if distractors is not None:
        check_distractor_steps(postprocess)
    xq, xg, steps, used = _prepared(query, gallery, postprocess, whitening)
    nq, ng = xq.shape[0], xg.shape[0]
    e = _checked_lists(easy, nq, ng, "easy")
    h = _checked_lists(hard, nq, ng, "hard")
    j = _checked_lists(junk, nq, ng, "junk")
    keep = min(max(1, int(keep_neighbors)), ng)
    scores, ids, _, final = search_gallery(xq, xg, None, keep, "Flat", "", chunk_size, steps=steps)
    listed = [np.unique(np.concatenate([e[q], h[q], j[q]])) for q in range(nq)]
    found = item_ranks(final, xg, listed, chunk_size=max(1, min(chunk_size, 512)))
    index: dict[str, Any] = {"factory": "Flat", "search_params": ""}
    index["bytes_per_vector"] = 4.0 * xg.shape[1]
    if distractors is not None:
        options: dict[str, Any] = {"steps": steps, "whitening": used, "chunk_size": chunk_size}
        options.update(keep=int(keep_neighbors), dim=np.shape(gallery)[1])
        found, (scores, ids), index["distractors"] = _with_distractors(
            final, xg, listed, found, (scores, ids), distractors, options
        )
    rank_of = [dict(zip(listed[q].tolist(), found[q].tolist(), strict=True)) for q in range(nq)]
    metrics, per_setup = _setup_scores(e, h, j, rank_of, kappas)
    scored = np.flatnonzero(~np.isnan(per_setup["medium"]))
    if scored.size == 0:
        raise ValueError("no query has an easy or hard gallery item: nothing to score")
    return RetrievalResult(
        metrics=metrics,
        num_queries=int(scored.size),
        num_excluded=int(nq - scored.size),
        index=index,
        query_rows=scored,
        per_query={f"ap_{s}": per_setup[s][scored] for s in SETUPS},
        neighbor_ids=ids[scored, : int(keep_neighbors)],
        neighbor_scores=scores[scored, : int(keep_neighbors)],
    )


def evaluate_relevant_lists(
    query: np.ndarray,
    gallery: np.ndarray,
    relevant: IdLists,
    ks: Sequence[int] = (100,),
    factory: str = "Flat",
    search_params: str = "",
    keep_neighbors: int = 0,
    chunk_size: int = 4096,
    postprocess: Postprocess | None = None,
    whitening: Whitening | None = None,
) -> RetrievalResult:
    """mAP@k of queries whose relevant gallery items are listed (GLDv2 retrieval: k = 100).

    ``map@{k}[q] = (1 / min(R_q, k)) * sum_{i<=k} P(i) rel(i)`` with R_q the length of the
    query's list (the normaliser the GLDv2 paper and its Kaggle metric use; the same as
    :func:`retrieval.evaluation.metrics.map_at_k`). Queries with an empty list are left out
    (``num_excluded``). A k larger than the gallery is clamped to it.

    Args:
        query: (nq, d) floats; gallery: (ng, d) floats.
        relevant: per query, the gallery positions (0-based) relevant to it.
        ks: the cut-offs.
        factory, search_params: the FAISS index searched (``"Flat"``: exact).
        keep_neighbors, chunk_size, postprocess, whitening: as :func:`evaluate_revisited`.

    Raises:
        ValueError: bad embeddings, lists or ks, or no query with a relevant item.
    """
    xq, xg, steps, _ = _prepared(query, gallery, postprocess, whitening)
    nq, ng = xq.shape[0], xg.shape[0]
    lists = _checked_lists(relevant, nq, ng, "relevant")
    cuts = sorted({positive_int(k, "each of ks") for k in ks})
    counts = np.array([np.unique(ids).size for ids in lists], dtype=np.int64)
    scored = np.flatnonzero(counts > 0)
    if scored.size == 0:
        raise ValueError("no query has a relevant gallery item: nothing to score")
    want = min(max(max(cuts), int(keep_neighbors)), ng)
    scores, ids, index, _ = search_gallery(
        xq[scored], xg, None, want, factory, search_params, chunk_size, steps=steps
    )
    hits = np.stack([np.isin(ids[n], lists[q]) for n, q in enumerate(scored.tolist())])
    codes, ones = hits.astype(np.int64), np.ones(scored.size, dtype=np.int64)
    per_query = {f"map@{k}": map_at_k(codes, ones, counts[scored], min(k, want)) for k in cuts}
    return RetrievalResult(
        metrics={name: float(v.mean()) for name, v in per_query.items()},
        num_queries=int(scored.size),
        num_excluded=int(nq - scored.size),
        index={
            "factory": factory,
            "search_params": search_params,
            "bytes_per_vector": float(index.bytes_per_vector),
        },
        query_rows=scored,
        per_query=per_query,
        neighbor_ids=ids[:, : int(keep_neighbors)],
        neighbor_scores=scores[:, : int(keep_neighbors)],
    )


#: Manifest columns of query rows that list their gallery items by label, per benchmark.
REVISITED_COLUMNS = ("gnd_easy", "gnd_hard", "gnd_junk")
RELEVANT_COLUMN = "gnd_relevant"


def listed_protocol(rows: Sequence[ManifestRow]) -> str | None:
    """``"revisited"`` or ``"relevant lists"`` when the query rows of ``rows`` list their
    gallery items in the columns above (written by the roxford5k, rparis6k and gldv2
    converters), else ``None``: labels decide relevance."""
    columns = {name for r in rows if r.is_query for name in r.extra}
    if set(REVISITED_COLUMNS) <= columns:
        return "revisited"
    if RELEVANT_COLUMN in columns:
        return "relevant lists"
    return None


def evaluate_listed(
    embeddings: np.ndarray,
    rows: Sequence[ManifestRow],
    ks: Sequence[int],
    **options: Any,
) -> tuple[RetrievalResult, np.ndarray, np.ndarray]:
    """Score one split whose query rows list their gallery items (:func:`listed_protocol`).

    Query rows (``is_query``) search gallery rows (``is_gallery``); the listed names are
    gallery labels. Revisited benchmarks: :func:`evaluate_revisited` with ``kappas=ks``;
    others: :func:`evaluate_relevant_lists` with ``ks``. ``options`` are those of
    :func:`retrieval.evaluation.evaluate_embeddings`; the ones these protocols do not use
    (``metrics``, ``compare_exact``, ``seed``, ``background``) are ignored: the benchmarks
    define their own metrics. ``distractors`` (blocks of vectors, see
    :func:`evaluate_revisited`) are for the revisited benchmarks only.

    Returns:
        ``(result, query_rows, gallery_rows)`` as :func:`retrieval.evaluation.evaluate_protocol`.

    Raises:
        ValueError: no listed columns, a row both query and gallery, a listed name that is no
            gallery label, or the errors of the evaluations.
    """
    kind = listed_protocol(rows)
    if kind is None:
        raise ValueError("no query row lists its gallery items (gnd_* columns)")
    q = np.array([i for i, r in enumerate(rows) if r.is_query], dtype=np.int64)
    g = np.array([i for i, r in enumerate(rows) if r.is_gallery], dtype=np.int64)
    if np.intersect1d(q, g).size:
        raise ValueError("a row is both query and gallery: mark each row as exactly one of them")
    position = {rows[i].label: n for n, i in enumerate(g.tolist())}

    def ids(row: ManifestRow, column: str) -> np.ndarray:
        names = row.extra.get(column, "").split()
        if unknown := [name for name in names if name not in position]:
            raise ValueError(
                f"query {row.label!r}, column {column!r}: {unknown[0]!r} is no gallery label; "
                "convert the benchmark again or use its complete image set"
            )
        return np.array([position[name] for name in names], dtype=np.int64)

    queries = [rows[i] for i in q.tolist()]
    names = ("keep_neighbors", "chunk_size", "postprocess", "whitening", "distractors")
    shared: dict[str, Any] = {k: options[k] for k in names if k in options}
    if kind == "revisited":
        easy, hard, junk = ([ids(r, c) for r in queries] for c in REVISITED_COLUMNS)
        result = evaluate_revisited(
            embeddings[q], embeddings[g], easy, hard, junk, kappas=ks, **shared
        )
    else:
        if shared.pop("distractors", None) is not None:
            raise ValueError(
                "distractors (+distractors=...) belong to the revisited benchmarks (data=roxford5k "
                "or data=rparis6k): drop them for this dataset"
            )
        relevant = [ids(r, RELEVANT_COLUMN) for r in queries]
        shared.update({k: options[k] for k in ("factory", "search_params") if k in options})
        result = evaluate_relevant_lists(embeddings[q], embeddings[g], relevant, ks=ks, **shared)
    return result, q, g

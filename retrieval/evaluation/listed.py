"""Evaluation of benchmarks whose ground truth lists each query's gallery items by name instead
of giving every image a label: Revisited Oxford/Paris (easy, hard and junk lists, scored by
the rules below) and GLDv2 retrieval (one relevant list per query,
scored by mAP@100).

Queries search the gallery through the one :class:`~retrieval.index.EmbeddingIndex`, with the
search-time steps that change vectors or queries (whitening, DBA, αQE); positions in each
query's full ranking are counted by :func:`retrieval.evaluation.ranking.item_ranks`, so a large
gallery never needs a query x gallery matrix. Equal scores rank by ascending gallery id.
Revisited Oxford/Paris +R1M adds a million distractors to the gallery without holding them:
:mod:`retrieval.evaluation.distractors` counts, one block of them at a time, those scoring
above each listed gallery item.

The scoring rules of the Revisited Oxford and Paris benchmarks (Radenović et al., CVPR 2018),
as revisitop's ``compute_map`` applies them and every paper that reports on them uses them.

Each query lists its gallery items as ``easy``, ``hard`` and ``junk``. Three setups are scored:

====== =================== ======================
setup  positives           junk (left out)
====== =================== ======================
easy   easy                junk + hard
medium easy + hard         junk
hard   hard                junk + easy
====== =================== ======================

Per query and setup, on the query's full ranking of the gallery:

1. junk is removed from the ranking before anything is counted: a positive's 0-based position
   ``p`` becomes ``p - (number of junk items strictly before it)``;
2. AP is the trapezoidal area under the precision-recall curve: each positive, the j-th
   (0-based) found at 0-based position ``p``, adds ``(P0 + P1) / (2 * n)`` with
   ``P0 = j / p`` (1 when ``p == 0``), ``P1 = (j + 1) / (p + 1)`` and ``n`` the number of
   positives the ground truth lists (found or not);
3. mP@k divides by ``min(k, rank of the last positive)`` (1-based, after the junk removal):
   ``kq = min(max rank, k)`` and ``mP@k = (positives ranked <= kq) / kq``;
4. a query with no positive in a setup is left out of that setup's means.

Rankings here are by inner product, descending, equal scores by ascending gallery id, as
everywhere in the project (``retrieval.evaluation.ranking``). This module is pure math on
positions; :mod:`retrieval.evaluation.listed` finds the positions through a search.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retrieval.data.manifest import ManifestRow
from retrieval.evaluation.distractors import check_distractor_steps, merge_top, scan_distractors
from retrieval.evaluation.evaluate import RetrievalResult, l2_normalised
from retrieval.evaluation.gallery_search import apply_vector_steps, search_gallery
from retrieval.evaluation.metrics import map_at_k
from retrieval.evaluation.ranking import item_ranks
from retrieval.infra.checks import checked_vectors, positive_int
from retrieval.postprocess import Postprocess, Whitening

__all__ = [
    "KAPPAS",
    "RevisitedScores",
    "SETUPS",
    "evaluate_listed",
    "evaluate_relevant_lists",
    "evaluate_revisited",
    "listed_protocol",
    "positions_in_ranking",
    "revisited_map",
    "revisited_query",
    "revisited_rankings",
    "setup_lists",
    "trapezoid_ap",
    "without_junk",
]


IdLists = Sequence[Sequence[int] | np.ndarray]
#: The setups, in the order papers print them.
SETUPS = ("easy", "medium", "hard")
#: The k of mP@k that revisitop's example and the papers report.
KAPPAS = (1, 5, 10)


def _prepared(
    query: np.ndarray,
    gallery: np.ndarray,
    steps: Postprocess | None,
    whitening: Whitening | None,
) -> tuple[np.ndarray, np.ndarray, Postprocess | None, Whitening | None]:
    """Checked, L2-normalised queries and gallery after whitening and DBA, the steps, and the
    whitening applied (fitted here when ``whiten.fit_on=gallery``; None without whitening)."""
    xq = checked_vectors(query, "query", integers=False, empty=False)
    xg = checked_vectors(gallery, "gallery", integers=False, empty=False)
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
    :mod:`retrieval.evaluation.listed`). A setup in which no query has a positive has no
    metrics. ``num_queries`` counts the queries with a positive in the medium setup (easy or
    hard items); ``per_query`` holds their AP per setup (NaN where a setup leaves one out).
    With ``distractors``, ``index["distractors"]`` is their count.

    ``query`` (the cropped queries' embeddings) and ``gallery`` are (n, d) floats; ``easy``,
    ``hard``, ``junk``: per query, gallery positions (0-based) of its ground truth; ``kappas``:
    the k of mP@k. ``postprocess``: whitening (``whitening`` when fitted on the training
    split), DBA and αQE as in every evaluation; re-ranking and score normalisation are
    refused, and with distractors DBA and αQE too. ``distractors``: blocks of (n_i, d) vectors
    of images relevant to no query (R1M), read once, a block at a time, whitened like the
    gallery; they rank as gallery ids ``ng, ng + 1, ...`` after every gallery item on equal
    scores.

    Raises:
        ValueError: bad embeddings, lists or distractor blocks, DBA or αQE with distractors,
            or no query with any positive.
    """
    if distractors is not None:
        check_distractor_steps(postprocess)
    xq, xg, steps, used = _prepared(query, gallery, postprocess, whitening)
    nq, ng = xq.shape[0], xg.shape[0]
    e, h, j = (
        _checked_lists(x, nq, ng, n) for x, n in ((easy, "easy"), (hard, "hard"), (junk, "junk"))
    )
    first = min(max(1, int(keep_neighbors)), ng)
    scores, ids, _, final = search_gallery(xq, xg, None, first, "Flat", "", chunk_size, steps=steps)
    listed = [np.unique(np.concatenate([e[q], h[q], j[q]])) for q in range(nq)]
    found = item_ranks(final, xg, listed, chunk_size=max(1, min(chunk_size, 512)))
    index: dict[str, Any] = {"factory": "Flat", "search_params": ""}
    index["bytes_per_vector"] = 4.0 * xg.shape[1]
    if distractors is not None:
        options = {"steps": steps, "whitening": used, "chunk_size": chunk_size}
        options.update(keep=int(keep_neighbors), dim=np.shape(gallery)[1])
        found, (scores, ids), index["distractors"] = _with_distractors(
            final, xg, listed, found, (scores, ids), distractors, options
        )
    rank_of = [dict(zip(listed[q].tolist(), found[q].tolist(), strict=True)) for q in range(nq)]
    metrics, per_setup = _setup_scores(e, h, j, rank_of, kappas)
    keep = int(keep_neighbors)
    return _revisited_result(metrics, per_setup, index, scores[:, :keep], ids[:, :keep])


def _revisited_result(
    metrics: dict[str, float],
    per_setup: dict[str, np.ndarray],
    index: dict[str, Any],
    scores: np.ndarray,
    ids: np.ndarray,
) -> RetrievalResult:
    """The result of the queries scored in the medium setup (those with easy or hard items)."""
    scored = np.flatnonzero(~np.isnan(per_setup["medium"]))
    if scored.size == 0:
        raise ValueError("no query has an easy or hard gallery item: nothing to score")
    return RetrievalResult(
        metrics=metrics,
        num_queries=int(scored.size),
        num_excluded=int(len(ids) - scored.size),
        index=index,
        query_rows=scored,
        per_query={f"ap_{s}": per_setup[s][scored] for s in SETUPS},
        neighbor_ids=ids[scored],
        neighbor_scores=scores[scored],
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


def _ids(values: object, name: str) -> np.ndarray:
    """A 1-D int64 array of gallery ids (any integer sequence; empty allowed)."""
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D sequence of integer ids, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


def setup_lists(
    easy: Sequence[int] | np.ndarray,
    hard: Sequence[int] | np.ndarray,
    junk: Sequence[int] | np.ndarray,
    setup: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, junk)`` gallery ids of one query in ``setup`` (easy, medium or hard).

    Raises:
        ValueError: an unknown setup, or ids that are not 1-D integers.
    """
    e, h, j = _ids(easy, "easy"), _ids(hard, "hard"), _ids(junk, "junk")
    if setup == "easy":
        return e, np.concatenate([j, h])
    if setup == "medium":
        return np.concatenate([e, h]), j
    if setup == "hard":
        return h, np.concatenate([j, e])
    raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")


def without_junk(positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives once the junk is taken out of the ranking.

    Args:
        positives: (n,) sorted 0-based positions of the positives in the ranking.
        junk: (m,) sorted 0-based positions of the junk items in it.

    Returns:
        (n,) int64: each position minus the junk positions strictly before it. An item listed
        both as positive and as junk sits at one position and does not move itself.
    """
    pos = np.asarray(positives, dtype=np.int64)
    bad = np.asarray(junk, dtype=np.int64)
    return pos - np.searchsorted(bad, pos, side="left")


def trapezoid_ap(positions: np.ndarray, num_positives: int) -> float:
    """Trapezoidal average precision of positives found at sorted 0-based ``positions``.

    ``AP = sum_j (P0_j + P1_j) / (2 * num_positives)`` with ``P0_j = j / p_j`` (1 when
    ``p_j == 0``) and ``P1_j = (j + 1) / (p_j + 1)``, j 0-based. Example: positions [0, 2] of 2
    positives give ((1 + 1) + (1/2 + 2/3)) / 4 = 0.7917.

    Args:
        positions: (n,) strictly increasing non-negative ints (after :func:`without_junk`).
        num_positives: the positives the ground truth lists, >= n and >= 1.

    Raises:
        ValueError: ``num_positives < max(1, n)``.
    """
    p = np.asarray(positions, dtype=np.float64)
    if num_positives < max(1, p.size):
        raise ValueError(f"num_positives={num_positives} must be >= 1 and >= the {p.size} found")
    j = np.arange(p.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.where(p == 0, 1.0, j / p)
    after = (j + 1) / (p + 1)
    return float(((before + after) / 2.0).sum() / num_positives)


def revisited_query(
    positives: np.ndarray, junk: np.ndarray, num_positives: int, kappas: Sequence[int] = KAPPAS
) -> tuple[float, np.ndarray]:
    """``(AP, mP@k for each k of kappas)`` of one query in one setup.

    Args:
        positives: sorted 0-based positions of the positives in the full ranking (junk still
            in it).
        junk: sorted 0-based positions of the junk items in it.
        num_positives: the positives listed, >= 1.
        kappas: the k of mP@k, each >= 1.

    Returns:
        AP as :func:`trapezoid_ap`, and a float64 (len(kappas),) array with
        ``mP@k = (positives at 1-based rank <= kq) / kq``, ``kq = min(k, last positive's
        rank)``. A ranking holding none of the positives (a truncated one) scores 0.
    """
    pos = without_junk(positives, junk)
    ap = trapezoid_ap(pos, num_positives)
    prs = np.zeros(len(kappas), dtype=np.float64)
    if pos.size:
        ranks = pos + 1
        for n, k in enumerate(kappas):
            kq = min(int(ranks.max()), int(k))
            prs[n] = np.count_nonzero(ranks <= kq) / kq
    return ap, prs


def positions_in_ranking(ranking: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions in ``ranking`` ((n,) gallery ids, best first) of the gallery
    items ``ids``; an id absent from the ranking has none."""
    return np.flatnonzero(np.isin(np.asarray(ranking), _ids(ids, "ids")))


@dataclass(frozen=True)
class RevisitedScores:
    """One setup's scores.

    Attributes:
        map: mean AP over the scored queries (NaN when none has a positive).
        aps: (nq,) AP per query; NaN for a query with no positive (left out).
        mp: (len(kappas),) mean mP@k over the scored queries.
        prs: (nq, len(kappas)) mP@k per query; NaN rows for those left out.
        kappas: the k of mP@k.
    """

    map: float
    aps: np.ndarray
    mp: np.ndarray
    prs: np.ndarray
    kappas: tuple[int, ...]

    @property
    def scored(self) -> np.ndarray:
        """(nq,) bool: the queries with at least one positive."""
        return ~np.isnan(self.aps)


def revisited_map(
    positives: Sequence[np.ndarray],
    junk: Sequence[np.ndarray],
    num_positives: Sequence[int],
    kappas: Sequence[int] = KAPPAS,
) -> RevisitedScores:
    """mAP and mean mP@k of one setup over queries, from positions in their full rankings.

    Args:
        positives: per query, sorted 0-based positions of its positives in its ranking.
        junk: per query, sorted 0-based positions of its junk items.
        num_positives: per query, the positives its ground truth lists; 0 leaves it out.
        kappas: the k of mP@k.

    Raises:
        ValueError: lists of different lengths, or a k < 1.
    """
    nq = len(positives)
    if len(junk) != nq or len(num_positives) != nq:
        raise ValueError(
            f"positives, junk and num_positives must have one entry per query: "
            f"{nq}, {len(junk)}, {len(num_positives)}"
        )
    ks = tuple(int(k) for k in kappas)
    if any(k < 1 for k in ks):
        raise ValueError(f"kappas must be >= 1, got {ks}")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(ks)), np.nan)
    for q in range(nq):
        if num_positives[q] > 0:
            aps[q], prs[q] = revisited_query(positives[q], junk[q], int(num_positives[q]), ks)
    scored = ~np.isnan(aps)
    if not scored.any():
        return RevisitedScores(float("nan"), aps, np.full(len(ks), np.nan), prs, ks)
    return RevisitedScores(float(aps[scored].mean()), aps, prs[scored].mean(axis=0), prs, ks)


def revisited_rankings(
    rankings: np.ndarray,
    easy: Sequence[Sequence[int] | np.ndarray],
    hard: Sequence[Sequence[int] | np.ndarray],
    junk: Sequence[Sequence[int] | np.ndarray],
    kappas: Sequence[int] = KAPPAS,
) -> dict[str, RevisitedScores]:
    """The three setups scored from full rankings.

    Args:
        rankings: (nq, n) gallery ids, row q query q's ranking best first (every gallery item
            once, for scores comparable with papers).
        easy, hard, junk: per query, the gallery ids of its ground truth.
        kappas: the k of mP@k.

    Returns:
        setup name -> :class:`RevisitedScores`, in the order of :data:`SETUPS`.
    """
    ranked = np.asarray(rankings)
    if ranked.ndim != 2 or not len(easy) == len(hard) == len(junk) == ranked.shape[0]:
        raise ValueError(
            f"rankings must be (nq, n) with one easy, hard and junk list per row; got "
            f"{ranked.shape}, {len(easy)}, {len(hard)}, {len(junk)}"
        )
    scores = {}
    for setup in SETUPS:
        pos, bad, counts = [], [], []
        for q in range(ranked.shape[0]):
            ok, out = setup_lists(easy[q], hard[q], junk[q], setup)
            pos.append(positions_in_ranking(ranked[q], ok))
            bad.append(positions_in_ranking(ranked[q], out))
            counts.append(ok.size)
        scores[setup] = revisited_map(pos, bad, counts, kappas)
    return scores

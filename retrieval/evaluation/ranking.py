"""Exact positions of the relevant gallery items in each query's full ranking.

The ranking of the gallery for a query is by inner product, descending, with exact score
ties broken by gallery index **ascending** (the smaller index first), the one tie rule of every
search path in the project: ``EmbeddingIndex.search`` re-orders FAISS's results so (FAISS's
``IndexFlatIP`` itself lists equal scores by descending index), and pytorch-metric-learning's
FAISS ``IndexFlatL2`` search orders them so too. Tested against both in
``tests/evaluation/test_ranking.py`` and ``tests/index/test_ties.py``.

Scores are float32 matrix products computed here with torch; FAISS computes its own and may
differ in the last bit, so scores equal to within ~1e-7 but not exactly equal may be ordered
differently by FAISS. Full average precision only needs these ranks (see
``retrieval.evaluation.metrics.average_precision``), never an nq x ng matrix or a full sort.

Cost of :func:`relevant_ranks`: one (chunk, d) x (d, ng) product per chunk of queries, then
per query one pass over its ng scores per relevant item or, when cheaper (about R > 8 on
CUB-sized galleries, R > 17 on SOP-sized ones), one sort of them and binary searches. Extra
memory: a float32 (chunk_size, ng) score buffer and per-row temporaries of ng scores.
"""

from __future__ import annotations

import numpy as np
import torch

from retrieval.infra.checks import checked_vectors, int_array, positive_int

__all__ = ["item_ranks", "relevant_ranks"]


def _use_sort(num_items: int, ng: int) -> bool:
    """Whether one sort of an ng-score row beats ``num_items`` scans of it, by a cost model: a
    scan ~ ng + 12_000, a sort ~ 20 ng + 30_000 (experiments/2026-12-07_cost_models_cpu.md)."""
    return num_items * (ng + 12_000) > 20 * ng + 30_000


def _count_before(row: np.ndarray, js: np.ndarray) -> np.ndarray:
    """For each gallery index j in ``js``: how many items of ``row`` rank before item j.

    Item g ranks before j when ``row[g] > row[j]``, or the scores are equal and g < j.
    Few items: one pass over the row each (``>=`` left of j, ``>`` right of it). Many: one
    sort of the row, binary searches, and a pass only for a score shared with other items.
    """
    t = row[js]
    if not _use_sort(js.size, row.size):
        return np.array(
            [
                np.count_nonzero(row[:j] >= tj) + np.count_nonzero(row[j + 1 :] > tj)
                for j, tj in zip(js.tolist(), t.tolist(), strict=True)
            ],
            dtype=np.int64,
        )
    srt = np.sort(row)
    right = np.searchsorted(srt, t, side="right")
    out = (row.size - right).astype(np.int64)
    for n in np.flatnonzero(right - np.searchsorted(srt, t, side="left") > 1).tolist():
        out[n] += np.count_nonzero(row[: js[n]] == t[n])
    return out


def _checked(
    xq: np.ndarray,
    xg: np.ndarray,
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    self_ids: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The inputs of :func:`relevant_ranks` checked: float32 vectors, int64 codes and self ids."""
    xq_, xg_ = checked_vectors(xq, "xq", integers=False), checked_vectors(xg, "xg", integers=False)
    nq, ng = xq_.shape[0], xg_.shape[0]
    if xq_.shape[1] != xg_.shape[1]:
        raise ValueError(f"xq has dimension {xq_.shape[1]} but xg has {xg_.shape[1]}")
    qc = int_array(query_codes, nq, "query_codes")
    gc = int_array(gallery_codes, ng, "gallery_codes")
    if self_ids is None:
        return xq_, xg_, qc, gc, None
    self_ = int_array(self_ids, nq, "self_ids")
    if nq and (self_.min() < 0 or self_.max() >= ng):
        raise ValueError(f"self_ids must lie in [0, ng={ng})")
    if np.any(gc[self_] != qc):
        raise ValueError("self_ids must point at gallery items with the query's own code")
    return xq_, xg_, qc, gc, self_


def relevant_ranks(
    xq: np.ndarray,
    xg: np.ndarray,
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    self_ids: np.ndarray | None = None,
    chunk_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based positions of each query's relevant gallery items in its full ranking.

    A gallery item is relevant to a query when their codes are equal. The ranking is of the
    whole gallery by inner product ``xq[q] @ xg[g]``, descending, exact ties broken by
    gallery index ascending (see the module docstring).
    With ``self_ids`` (leave-one-out), gallery item ``self_ids[q]`` is the query itself: it
    is removed from query q's ranking (positions count the other ng - 1 items) and is not
    relevant; exact duplicates of the query stay ordinary gallery items.

    Args:
        xq: (nq, d) float query embeddings (L2-normalised; converted to float32).
        xg: (ng, d) float gallery embeddings (L2-normalised; converted to float32).
        query_codes: (nq,) integer label code of each query.
        gallery_codes: (ng,) integer label code of each gallery item.
        self_ids: optional (nq,) integer gallery index of each query, with
            ``gallery_codes[self_ids] == query_codes``.
        chunk_size: queries scored per matrix product, >= 1.

    Returns:
        ``(ranks, num_relevant)``: ``num_relevant`` (nq,) int64 R_q, and ``ranks``
        (nq, max R) int64 (0 columns if nq == 0 or every R_q == 0) holding in row q its
        R_q ranks ascending, then zeros; a query with R_q == 0 gets an all-zero row.
        Feed the rows with R_q >= 1 to ``retrieval.evaluation.metrics.average_precision``.

    Raises:
        ValueError: non-2-D, non-float or non-finite embeddings, dimension mismatch, bad
            code or self_ids shapes or dtypes, self_ids out of range or with another code,
            or chunk_size < 1.
    """
    xq_, xg_, qc, gc, self_ = _checked(xq, xg, query_codes, gallery_codes, self_ids)
    positive_int(chunk_size, "chunk_size")
    nq, ng = xq_.shape[0], xg_.shape[0]
    order = np.argsort(gc, kind="stable")  # gallery indices grouped by code, ascending
    lo = np.searchsorted(gc[order], qc, side="left")
    hi = np.searchsorted(gc[order], qc, side="right")
    num_relevant = (hi - lo - (0 if self_ is None else 1)).astype(np.int64)
    ranks = np.zeros((nq, int(num_relevant.max()) if nq else 0), dtype=np.int64)
    if ranks.shape[1] == 0:
        return ranks, num_relevant

    xg_t = torch.from_numpy(xg_)
    buf = torch.empty((min(chunk_size, nq), ng), dtype=torch.float32)
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        scores = torch.mm(torch.from_numpy(xq_[start:stop]), xg_t.T, out=buf[: stop - start])
        for i, q in enumerate(range(start, stop)):
            if num_relevant[q] > 0:
                skip = None if self_ is None else int(self_[q])
                js = order[lo[q] : hi[q]]
                ranks[q, : js.size - (skip is not None)] = _row_ranks(scores[i].numpy(), js, skip)
    return ranks, num_relevant


def _row_ranks(row: np.ndarray, js: np.ndarray, skip: int | None) -> np.ndarray:
    """Ascending 1-based ranks of the items ``js`` in the scores ``row`` (changed in place),
    without the item ``skip`` (the query itself)."""
    if skip is not None:
        row[skip] = -np.inf  # never before anything: out of the ranking
        js = js[js != skip]
    return np.sort(_count_before(row, js)) + 1


def item_ranks(
    xq: np.ndarray,
    xg: np.ndarray,
    items: list[np.ndarray],
    chunk_size: int = 512,
) -> list[np.ndarray]:
    """1-based positions of chosen gallery items in each query's full ranking.

    The ranking is the one of :func:`relevant_ranks` (inner product, descending, exact ties by
    ascending gallery index); the items are named per query rather than by a label, as in
    benchmarks whose ground truth lists them (Revisited Oxford/Paris, GLDv2). Memory as in
    :func:`relevant_ranks`: a float32 (chunk_size, ng) score block, never (nq, ng) at once.

    Args:
        xq: (nq, d) float query embeddings; xg: (ng, d) float gallery embeddings.
        items: nq integer arrays of gallery indices in [0, ng) (any order, empty allowed).
        chunk_size: queries scored per matrix product, >= 1.

    Returns:
        nq int64 arrays: ``out[q][i]`` is the 1-based rank of gallery item ``items[q][i]``.

    Raises:
        ValueError: bad embeddings, ``len(items) != nq``, an index outside [0, ng), or
            chunk_size < 1.
    """
    xq_, xg_ = checked_vectors(xq, "xq", integers=False), checked_vectors(xg, "xg", integers=False)
    nq, ng = xq_.shape[0], xg_.shape[0]
    if xq_.shape[1] != xg_.shape[1]:
        raise ValueError(f"xq has dimension {xq_.shape[1]} but xg has {xg_.shape[1]}")
    if len(items) != nq:
        raise ValueError(f"items must hold one array per query ({nq}), got {len(items)}")
    positive_int(chunk_size, "chunk_size")
    wanted = [np.asarray(i, dtype=np.int64).reshape(-1) for i in items]
    if any(w.size and (w.min() < 0 or w.max() >= ng) for w in wanted):
        raise ValueError(f"items must be gallery indices in [0, ng={ng})")
    out = [np.zeros(0, dtype=np.int64) for _ in wanted]
    xg_t = torch.from_numpy(xg_)
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        block = torch.mm(torch.from_numpy(xq_[start:stop]), xg_t.T).numpy()
        for i, q in enumerate(range(start, stop)):
            if wanted[q].size:
                out[q] = _count_before(block[i], wanted[q]) + 1
    return out

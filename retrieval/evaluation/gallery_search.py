"""The searches of an evaluation: the gallery indexed and searched by the queries (query /
gallery), or by its own items with each one's own id removed (leave-one-out), through the
search-time steps of :mod:`retrieval.postprocess` around the search."""

from __future__ import annotations

import numpy as np

from retrieval.index import EmbeddingIndex, drop_self, self_join_pays_off
from retrieval.postprocess import Postprocess, Whitening, database_augment, whitening_for
from retrieval.postprocess.query import search_with_steps

__all__ = ["apply_vector_steps", "search_excluding_self", "search_gallery"]


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


def search_gallery(
    xq: np.ndarray,
    xg: np.ndarray,
    self_ids: np.ndarray | None,
    k: int,
    factory: str,
    search_params: str,
    chunk_size: int,
    steps: Postprocess | None = None,
    queries_stored: bool = True,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, EmbeddingIndex, np.ndarray]:
    """``(scores, ids, index, final queries)``: ``k`` results of ``xq`` in ``xg`` (without
    self), through the query-time steps (αQE, re-ranking, score normalisation against
    ``background``, in the searched space) of ``steps`` when given."""
    index = EmbeddingIndex(xg.shape[1], factory=factory, search_params=search_params)
    index.add(xg)

    def search(x: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        if self_ids is None:
            return index.search(x, want, chunk_size=chunk_size)
        stored = queries_stored and x is xq
        return search_excluding_self(index, x, self_ids, want, chunk_size, stored)

    if steps is None or (steps.aqe is None and steps.rerank is None and not steps.score_norm):
        scores, ids = search(xq, k)
        return scores, ids, index, xq
    scores, ids, final = search_with_steps(
        xq,
        k,
        search,
        lambda found: xg[found],
        aqe=steps.aqe,
        rerank=steps.rerank,
        score_norm=steps.score_norm,
        background=background,
    )
    return scores, ids, index, final


def apply_vector_steps(
    xq: np.ndarray,
    xg: np.ndarray | None,
    steps: Postprocess,
    whitening: Whitening | None,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, Whitening | None, np.ndarray | None]:
    """Whitening of queries and gallery, then DBA of the gallery (``xg=None``: leave-one-out,
    the queries are the gallery). Returns ``(queries, gallery or None, whitening used,
    background whitened too or None)``; in leave-one-out with DBA the gallery comes back
    augmented and the queries not.

    Raises:
        ValueError: whitening to fit on the training split but none given.
    """
    if steps.whiten is not None:
        whitening = whitening_for(steps.whiten, whitening, xq if xg is None else xg)
        xq = whitening.apply(xq)
        xg = None if xg is None else whitening.apply(xg)
        background = None if background is None else whitening.apply(background)
    if steps.dba is not None:
        xg = database_augment(xq if xg is None else xg, steps.dba.k, steps.dba.alpha)
    return xq, xg, whitening, background

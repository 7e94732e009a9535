"""The search-time steps that change vectors, as pure functions:

- :func:`tta_embed`: test-time augmentation: an image embedded at several scales (and
  mirrored), the unit embeddings summed and normalised. The views are made from the
  preprocessed batch ``(B, 3, S, S)`` itself (bilinear resizing of the normalised pixels,
  ``align_corners=False``, and a horizontal flip), so the same views come out of every
  runtime: the augmentation is part of the exported model graph;
- :func:`database_augment`: database-side augmentation (DBA): every gallery vector replaced by
  the weighted mean of itself and its nearest gallery neighbours (:func:`dba_vectors_for`
  gives the vectors of rows added later);
- :func:`alpha_query_expansion`: α-query expansion (αQE, Radenović et al. 2018): the query
  replaced by the weighted mean of itself and its first results, then searched again.

The others: whitening (:mod:`retrieval.postprocess.whitening`), and k-reciprocal re-ranking
and score normalisation around a search (:mod:`retrieval.postprocess.query`). Neighbours are
ranked by inner product with exact ties broken by ascending id, as everywhere in the project.
Weights of neighbours are ``max(score, 0) ** alpha``; the vector itself weighs 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.infra.ties import top_k_columns

__all__ = [
    "alpha_query_expansion",
    "database_augment",
    "dba_vectors_for",
    "normalize_rows",
    "tta_embed",
    "tta_sizes",
]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def _weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    return np.maximum(scores, 0.0).astype(np.float64) ** float(alpha)


def database_augment(
    gallery: np.ndarray, k: int, alpha: float = 3.0, chunk_size: int = 1024
) -> np.ndarray:
    """DBA: each gallery row replaced by ``normalize(x_i + sum_j w_ij x_j)`` over its ``k - 1``
    nearest other rows j (ties by ascending row), ``w_ij = max(x_i . x_j, 0) ** alpha``.

    ``k`` counts the row itself (``k = 1`` changes nothing). Exact: every row is compared
    with every other, ``chunk_size`` rows at a time. Returns (n, d) float32.
    """
    x = np.asarray(gallery, dtype=np.float32)
    out = np.empty_like(x)
    for start in range(0, len(x), chunk_size):
        block = x[start : start + chunk_size]
        scores = block @ x.T
        own = np.arange(start, start + len(block))
        out[start : start + len(block)] = _augment(block, scores, x, k - 1, alpha, exclude=own)
    return out


def dba_vectors_for(new: np.ndarray, base: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """The DBA vectors of rows ``new`` (not yet in the gallery) as :func:`database_augment`
    gives them once they are: their neighbours are taken among ``base`` (the gallery's
    un-augmented rows) and each other, ids of ``new`` after those of ``base``."""
    new = np.asarray(new, dtype=np.float32)
    pool = np.concatenate([np.asarray(base, dtype=np.float32).reshape(-1, new.shape[1]), new])
    own = np.arange(len(pool) - len(new), len(pool))
    return _augment(new, new @ pool.T, pool, k - 1, alpha, exclude=own)


def _augment(
    rows: np.ndarray,
    scores: np.ndarray,
    pool: np.ndarray,
    neighbours: int,
    alpha: float,
    exclude: np.ndarray | None,
) -> np.ndarray:
    if neighbours <= 0:
        return normalize_rows(rows)
    cols = top_k_columns(scores, neighbours, exclude=exclude)
    w = _weights(np.take_along_axis(scores, cols, axis=1), alpha)
    mixed = rows.astype(np.float64) + np.einsum("qk,qkd->qd", w, pool[cols].astype(np.float64))
    return normalize_rows(mixed)


def alpha_query_expansion(
    queries: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """αQE: ``normalize(q + sum_j max(s_j, 0) ** alpha * g_j)`` over a query's first results.

    Args:
        queries: (nq, d) unit rows.
        neighbours: (nq, k, d) vectors of each query's first k results (as searched: whitened,
            and augmented when the gallery is).
        scores: (nq, k) their scores; ``-inf`` marks an empty slot (weight 0).

    Returns (nq, d) float32 unit rows.
    """
    s = np.where(np.isfinite(scores), scores, 0.0)
    w = _weights(s, alpha)
    mixed = np.asarray(queries, np.float64) + np.einsum(
        "qk,qkd->qd", w, np.asarray(neighbours, np.float64)
    )
    return normalize_rows(mixed)


def tta_sizes(side: int, scales: Sequence[float], multiple: int = 1) -> list[int]:
    """The square side of each view: ``side * scale`` rounded to a multiple of ``multiple``
    (a ViT's patch size), at least ``multiple``."""
    m = max(1, int(multiple))
    return [max(m, int(round(side * float(s) / m)) * m) for s in scales]


def tta_embed(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    multiple: int = 1,
) -> torch.Tensor:
    """``normalize(sum of embed(view))`` over the views of ``images`` (B, 3, S, S).

    ``embed`` maps a batch of any square size to unit rows; a scale of 1 uses the images as
    they are, others resize them to :func:`tta_sizes`; ``flip`` adds each view mirrored.
    """
    side = int(images.shape[-1])
    total: torch.Tensor | None = None
    for size in tta_sizes(side, scales, multiple):
        view = images
        if size != side:
            view = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        for v in (view, view.flip(-1)) if flip else (view,):
            out = embed(v).float()
            total = out if total is None else total + out
    assert total is not None
    return F.normalize(total, p=2.0, dim=-1)

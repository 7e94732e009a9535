"""Whitening of global descriptors, applied to queries and gallery alike: PCA-whitening (Jégou &
Chum 2012), or learned whitening from matching pairs (Radenović et al. 2018), with optional
shrinkage of the covariance and dimension reduction. :func:`fit_whitening` fits one;
:class:`Whitening` applies it (as the linear layer an exported model holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.infra.checks import positive_int

if TYPE_CHECKING:
    from retrieval.postprocess.config import Whiten
from retrieval.postprocess.steps import normalize_rows

__all__ = ["Whitening", "fit_whitening", "whitening_for"]


@dataclass(frozen=True)
class Whitening:
    """A fitted whitening: ``x -> normalize((x - mean) @ projection)``.

    ``mean`` is (d,), ``projection`` (d, d_out) float64 (columns ordered by decreasing
    variance, so a prefix of them is the dimension reduction). ``method`` is ``pca`` or
    ``learned``; ``shrinkage`` what the fit used.
    """

    mean: np.ndarray
    projection: np.ndarray
    method: str = "pca"
    shrinkage: float = 0.0

    @property
    def dim_in(self) -> int:
        return int(self.projection.shape[0])

    @property
    def dim_out(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, dim_in) rows -> (n, dim_out) float32 unit rows."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"whitening takes (n, {self.dim_in}) vectors, got {x.shape}")
        weight, bias = self.as_linear()  # the exported model's layer computes the same
        return normalize_rows(np.asarray(x, dtype=np.float32) @ weight.T + bias)

    def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight, bias)`` float32 of the same map as a linear layer ``x @ weight.T + bias``
        (before the normalisation): weight (dim_out, dim_in), bias (dim_out,)."""
        weight = self.projection.T
        return weight.astype(np.float32), (-self.mean @ self.projection).astype(np.float32)


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(1 - s) C + s * (trace(C) / d) I``: pulls small eigenvalues up, so whitening does not
    blow up directions of (near) zero variance."""
    d = cov.shape[0]
    return (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)


def _inverse_sqrt(cov: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors (columns, by decreasing eigenvalue) and ``1 / sqrt(eigenvalue + eps)``."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2.0)
    order = np.argsort(-values, kind="stable")
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    # a fixed sign per eigenvector (largest component positive): fits are reproducible
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    scale = values.max() if values.size and values.max() > 0 else 1.0
    return vectors, 1.0 / np.sqrt(values + eps * scale)


def fit_whitening(
    x: np.ndarray,
    dim: int | None = None,
    shrinkage: float = 0.0,
    labels: np.ndarray | None = None,
    method: str = "pca",
    eps: float = 1e-6,
) -> Whitening:
    """Fit a whitening on the (n, d) vectors ``x``.

    Args:
        dim: keep this many output dimensions (the directions of largest variance);
            ``None`` keeps ``d``.
        shrinkage: in [0, 1]: the covariance is shrunk towards its mean eigenvalue
            (``(1 - s) C + s tr(C)/d I``); 0 is plain whitening, 1 a rotation and a centring.
        labels: (n,) labels, needed by ``method="learned"``.
        method: ``pca``: centre, then scale the principal directions to unit variance.
            ``learned``: with the labels' matching pairs, first whiten the scatter of the
            differences within labels, then rotate onto the principal directions of the data
            (Radenović et al., "Fine-tuning CNN image retrieval with no human annotation").
        eps: added to each eigenvalue, relative to the largest.

    Raises:
        ValueError: fewer than 2 vectors, bad dim, shrinkage or method, non-finite values,
            or ``learned`` without labels that give a matching pair.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"whitening needs at least 2 vectors (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("whitening vectors contain NaN or infinite values")
    d = x.shape[1]
    out = d if dim is None else dim
    positive_int(out, "postprocess.whiten.dim (or null)", maximum=d)
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"postprocess.whiten.shrinkage must be in [0, 1], got {shrinkage!r}")
    mean = x.mean(axis=0)
    centred = x - mean
    if method == "pca":
        cov = _shrunk(centred.T @ centred / len(x), float(shrinkage))
        vectors, inv = _inverse_sqrt(cov, eps)
        projection = vectors * inv[None, :]
    elif method == "learned":
        if labels is None or len(labels) != len(x):
            raise ValueError("postprocess.whiten.method=learned needs one label per vector")
        diffs = _pair_differences(x, np.asarray(labels))
        scatter = _shrunk(diffs.T @ diffs / len(diffs), float(shrinkage))
        vectors, inv = _inverse_sqrt(scatter, eps)
        first = vectors * inv[None, :]  # whitens the within-label scatter
        projected = centred @ first
        rotation, _ = _inverse_sqrt(projected.T @ projected / len(x), eps)
        projection = first @ rotation
    else:
        raise ValueError(f"postprocess.whiten.method must be 'pca' or 'learned', got {method!r}")
    return Whitening(mean, projection[:, : int(out)], method, float(shrinkage))


def _pair_differences(x: np.ndarray, labels: np.ndarray, max_pairs: int = 200_000) -> np.ndarray:
    """``x_i - x_j`` of the pairs with equal labels (i < j), at most ``max_pairs`` of them,
    taken label by label (a seeded sample when there are more)."""
    _, codes = np.unique(labels, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    first, second = [], []
    for group in np.split(order, bounds):
        if len(group) > 1:
            i, j = np.triu_indices(len(group), k=1)
            first.append(group[i])
            second.append(group[j])
    if not first:
        raise ValueError("postprocess.whiten.method=learned needs labels with 2 or more vectors")
    a, b = np.concatenate(first), np.concatenate(second)
    if len(a) > max_pairs:
        pick = np.random.default_rng(0).choice(len(a), max_pairs, replace=False)
        a, b = a[pick], b[pick]
    return x[a] - x[b]


def whitening_for(whiten: Whiten, whitening: Whitening | None, gallery: np.ndarray) -> Whitening:
    """The whitening a search with the step ``whiten`` uses: ``whitening``, fitted beforehand
    on the training split, or with ``fit_on=gallery`` PCA-whitening fitted on ``gallery``
    (the searched vectors) here. Evaluation and export both take it from here.

    Raises:
        ValueError: ``fit_on=train`` but no ``whitening`` given.
    """
    if whitening is not None:
        return whitening
    if whiten.fit_on != "gallery":
        raise ValueError(
            "postprocess.whiten.fit_on=train: pass the whitening fitted on the "
            "training split (whitening=), or fit on the gallery (fit_on=gallery)"
        )
    return fit_whitening(gallery, dim=whiten.dim, shrinkage=whiten.shrinkage, method="pca")

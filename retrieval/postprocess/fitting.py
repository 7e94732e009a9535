"""Fitting the search-time steps on embeddings: the whitening and the score-normalisation
background learned from a training split's vectors, or the whitening fitted on the gallery
searched, each with a record of what it was fitted on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.postprocess.config import Postprocess, Whiten
from retrieval.postprocess.query import sample_background
from retrieval.postprocess.whitening import Whitening, fit_whitening, whitening_for

log = logging.getLogger(__name__)


@dataclass
class FittedSteps:
    """``steps`` with what they were fitted on: ``whitening`` when ``steps.whiten`` is on
    (fitted on the training split, or on the gallery by :meth:`gallery_whitening`),
    ``background`` the training split's vectors (a sample, before whitening) that
    ``steps.score_norm`` compares queries with, and ``fitted_on`` what each was fitted on (the
    ``fitted_on`` of a report and of a bundle's manifest)."""

    steps: Postprocess
    whitening: Whitening | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)
    background: np.ndarray | None = None

    def gallery_whitening(self, gallery: np.ndarray) -> Whitening | None:
        """The whitening of ``steps`` for the searched vectors ``gallery`` (None without
        ``whiten``): the one fitted on the training split, else (``fit_on=gallery``) one fitted
        on ``gallery`` now, kept and recorded in ``fitted_on``."""
        if self.steps.whiten is None:
            return None
        gallery = np.ascontiguousarray(gallery)
        if self.whitening is None:
            self.fitted_on["whiten"] = {"split": "gallery", "images": len(gallery)}
        self.whitening = whitening_for(self.steps.whiten, self.whitening, gallery)
        return self.whitening


def needs_training_split(steps: Postprocess) -> bool:
    """Whether fitting ``steps`` takes a training split's vectors: a whitening fitted on
    ``train``, or score normalisation."""
    train_whiten = steps.whiten is not None and steps.whiten.fit_on == "train"
    return train_whiten or steps.score_norm is not None


def fit_on_training_split(
    steps: Postprocess,
    vectors: np.ndarray,
    labels: np.ndarray,
    edited: Callable[[], np.ndarray] | None = None,
) -> FittedSteps:
    """``steps`` fitted on a training split's embeddings ``vectors`` (embedded with the TTA of
    ``steps``; ``labels`` one per row): the whitening when ``whiten.fit_on`` is ``train``
    (fitting on the gallery happens where the gallery is known: :meth:`FittedSteps.
    gallery_whitening`) and the score-normalisation background drawn from ``vectors``.

    ``edited``: for ``whiten.method=edits``, the embeddings of the same images edited, row for
    row (called only then).
    """
    whiten = steps.whiten if steps.whiten is not None and steps.whiten.fit_on == "train" else None
    fitted = FittedSteps(steps)
    if whiten is not None:
        fitted.whitening = _fit_whitening(whiten, vectors, labels, edited)
        fitted.fitted_on["whiten"] = {
            "split": "train",
            "images": len(vectors),
            "method": whiten.method,
        }
    if steps.score_norm is not None:
        fitted.background = sample_background(vectors, steps.score_norm)
        fitted.fitted_on["score_norm"] = {"split": "train", "background": len(fitted.background)}
    return fitted


def _fit_whitening(
    whiten: Whiten,
    vectors: np.ndarray,
    labels: np.ndarray,
    edited: Callable[[], np.ndarray] | None,
) -> Whitening:
    """``whiten`` fitted on the training split's ``vectors``: PCA, learned from its labels'
    pairs, or (``edits``) learned from each image paired with its edited copy (``edited()``
    embeds those), every image its own label."""
    count = len(labels)
    method = whiten.method
    if method == "edits":
        if edited is None:
            raise ValueError("postprocess.whiten.method=edits needs the edited images' vectors")
        vectors = np.concatenate([vectors, edited()])
        labels = np.concatenate([np.arange(count)] * 2)
        method = "learned"
    whitening = fit_whitening(
        vectors, dim=whiten.dim, shrinkage=whiten.shrinkage, labels=labels, method=method
    )
    log.info("whitening (%s) fitted on %d training images", whiten.method, count)
    return whitening

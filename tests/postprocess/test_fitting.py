"""Fitting the search-time steps on embeddings (:mod:`retrieval.postprocess.fitting`): what is
fitted on the training split's vectors, on the gallery's, and the record of each."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.postprocess import (
    FittedSteps,
    Postprocess,
    fit_on_training_split,
    fit_whitening,
    needs_training_split,
    sample_background,
)
from retrieval.postprocess.steps import normalize_rows


def _unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).standard_normal((rows, dim))).astype(
        np.float32
    )


def _steps(**node: object) -> Postprocess:
    return Postprocess.from_dict(node)


def test_the_training_split_is_needed_by_a_train_whitening_or_score_normalisation():
    assert not needs_training_split(_steps())
    assert not needs_training_split(_steps(whiten={"fit_on": "gallery"}, aqe={}, dba={}))
    assert needs_training_split(_steps(whiten={}))
    assert needs_training_split(_steps(score_norm={"background": 10}))


def test_a_whitening_and_a_background_fitted_on_the_training_split():
    vectors, labels = _unit(120), np.repeat(np.arange(30), 4)
    steps = _steps(whiten={"method": "learned", "dim": 8}, score_norm={"background": 50})
    fitted = fit_on_training_split(steps, vectors, labels)
    expected = fit_whitening(vectors, dim=8, labels=labels, method="learned")
    assert fitted.whitening is not None
    np.testing.assert_array_equal(fitted.whitening.apply(vectors), expected.apply(vectors))
    assert fitted.background is not None
    np.testing.assert_array_equal(fitted.background, sample_background(vectors, steps.score_norm))
    assert fitted.fitted_on == {
        "whiten": {"split": "train", "images": 120, "method": "learned"},
        "score_norm": {"split": "train", "background": 50},
    }
    assert fitted.gallery_whitening(_unit(10, seed=1)) is fitted.whitening  # kept, not refitted
    assert list(fitted.fitted_on) == ["whiten", "score_norm"]


def test_edits_pair_each_image_with_its_edited_copy():
    vectors, edited = _unit(40), _unit(40, seed=1)
    asked = []

    def edited_vectors() -> np.ndarray:
        asked.append(True)
        return edited

    fitted = fit_on_training_split(
        _steps(whiten={"method": "edits", "dim": 8}), vectors, np.zeros(40), edited_vectors
    )
    pairs = np.concatenate([np.arange(40)] * 2)
    both = np.concatenate([vectors, edited])
    expected = fit_whitening(both, dim=8, labels=pairs, method="learned")
    assert asked == [True] and fitted.whitening is not None
    np.testing.assert_array_equal(fitted.whitening.apply(vectors), expected.apply(vectors))
    assert fitted.fitted_on["whiten"] == {"split": "train", "images": 40, "method": "edits"}
    fit_on_training_split(_steps(whiten={"dim": 8}), vectors, np.zeros(40), edited_vectors)
    assert asked == [True]  # only edits embed the edited copies
    with pytest.raises(ValueError, match="edited images"):
        fit_on_training_split(_steps(whiten={"method": "edits"}), vectors, np.zeros(40))


def test_a_whitening_fitted_on_the_gallery_is_kept_and_recorded():
    gallery = _unit(60)
    assert FittedSteps(_steps(aqe={})).gallery_whitening(gallery) is None
    fitted = FittedSteps(_steps(whiten={"fit_on": "gallery", "dim": 8}))
    whitening = fitted.gallery_whitening(gallery)
    expected = fit_whitening(gallery, dim=8, method="pca")
    assert whitening is fitted.whitening and whitening is not None
    np.testing.assert_array_equal(whitening.apply(gallery), expected.apply(gallery))
    assert fitted.fitted_on == {"whiten": {"split": "gallery", "images": 60}}

"""Score normalisation (SSCD): checked against a naive loop, and through evaluation, where it
changes µAP but never a query's ranking."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.evaluation import evaluate_embeddings
from retrieval.postprocess import (
    Postprocess,
    ScoreNorm,
    background_similarity,
    normalize_scores,
    sample_background,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_kth(queries: np.ndarray, background: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries:
        sims = sorted((float(q @ b) for b in background), reverse=True)
        out.append(sims[min(k, len(sims)) - 1])
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("k", [1, 3, 50])
def test_background_similarity_matches_a_naive_loop(k: int) -> None:
    rng = np.random.default_rng(k)
    queries, background = _unit(rng, 37, 8), _unit(rng, 20, 8)
    background[5] = background[6]  # exact duplicates in the background
    got = background_similarity(queries, background, k)
    np.testing.assert_allclose(got, _naive_kth(queries, background, k), atol=1e-6)


def test_normalize_scores_subtracts_beta_times_the_kth_similarity_per_query() -> None:
    rng = np.random.default_rng(0)
    queries, background = _unit(rng, 5, 4), _unit(rng, 9, 4)
    scores = np.array([[0.9, 0.5, -np.inf]] * 5, dtype=np.float32)
    norm = ScoreNorm(k=2, beta=0.5)
    got = normalize_scores(scores, queries, background, norm)
    kth = _naive_kth(queries, background, 2)
    for row in range(5):
        assert got[row, 0] == pytest.approx(0.9 - 0.5 * kth[row], abs=1e-6)
        assert got[row, 1] == pytest.approx(0.5 - 0.5 * kth[row], abs=1e-6)
        assert np.isneginf(got[row, 2])  # an empty slot stays empty


def test_background_is_a_seeded_sample_in_order() -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    norm = ScoreNorm(background=7)
    first, again = sample_background(x, norm), sample_background(x, norm)
    assert first.shape == (7, 2) and np.array_equal(first, again)
    assert np.all(np.diff(first[:, 0]) > 0)  # kept in their order
    assert sample_background(x, ScoreNorm(background=50)).shape == (20, 2)


def test_bad_backgrounds_and_settings_are_named() -> None:
    with pytest.raises(ValueError, match="background is empty"):
        background_similarity(np.zeros((2, 3), np.float32), np.zeros((0, 3), np.float32), 1)
    with pytest.raises(ValueError, match="dim 4"):
        background_similarity(np.zeros((2, 3), np.float32), np.zeros((5, 4), np.float32), 1)
    with pytest.raises(ValueError, match="score_norm.k"):
        ScoreNorm(k=0)
    with pytest.raises(ValueError, match="unknown settings"):
        Postprocess.from_dict({"score_norm": {"kk": 1}})


def _copies(seed: int) -> tuple[np.ndarray, ...]:
    """Originals in a gallery with distractors; noisy copies of the originals as queries,
    each query at its own density; a background of other images."""
    rng = np.random.default_rng(seed)
    originals, distractors = _unit(rng, 30, 16), _unit(rng, 60, 16)
    noise = rng.normal(size=(30, 16)).astype(np.float32) * rng.uniform(0.1, 1.2, (30, 1))
    queries = originals + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = np.concatenate([originals, distractors])
    labels_g = np.array([f"o{i}" for i in range(30)] + [f"d{i}" for i in range(60)])
    labels_q = np.array([f"o{i}" for i in range(30)])
    return queries, labels_q, gallery, labels_g, _unit(rng, 200, 16)


def test_evaluation_changes_micro_ap_and_never_the_ranking() -> None:
    queries, labels_q, gallery, labels_g, background = _copies(0)
    common = {"ks": (1, 5), "metrics": ["recall", "micro_ap"], "keep_neighbors": 5}
    plain = evaluate_embeddings(queries, labels_q, gallery, labels_g, **common)
    steps = Postprocess(score_norm=ScoreNorm(k=1))
    normed = evaluate_embeddings(
        queries, labels_q, gallery, labels_g, **common, postprocess=steps, background=background
    )
    assert normed.metrics["recall@1"] == plain.metrics["recall@1"]
    np.testing.assert_array_equal(normed.neighbor_ids, plain.neighbor_ids)
    assert normed.metrics["micro_ap@5"] != plain.metrics["micro_ap@5"]
    shift = _naive_kth(queries, background, 1)
    np.testing.assert_allclose(
        normed.neighbor_scores, plain.neighbor_scores - shift[:, None], atol=1e-5
    )
    with pytest.raises(ValueError, match="needs its background"):
        evaluate_embeddings(queries, labels_q, gallery, labels_g, **common, postprocess=steps)

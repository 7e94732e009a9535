"""The search-time steps against naive loops, and their use by the evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.evaluation import evaluate_embeddings
from retrieval.evaluation.metrics import map_at_r, recall_at_k
from retrieval.infra.ties import top_k_columns
from retrieval.postprocess import (
    AQE,
    DBA,
    TTA,
    Postprocess,
    Rerank,
    Whiten,
    alpha_query_expansion,
    database_augment,
    dba_vectors_for,
    fit_whitening,
    k_reciprocal_rerank,
    search_with_steps,
    tta_embed,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n_labels: int = 12, per: int = 5, dim: int = 16, noise: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, dim))
    labels = np.repeat(np.arange(n_labels), per)
    return unit(centres[labels] + noise * rng.normal(size=(len(labels), dim))), labels


def naive_order(scores: np.ndarray) -> list[int]:
    """Columns by descending score, equal scores by ascending column (a stable sort)."""
    return sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))


# ------------------------------------------------------------------------------ whitening


def test_pca_whitening_gives_identity_covariance_and_matches_a_naive_fit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 3.0
    w = fit_whitening(x, shrinkage=0.0, eps=1e-12)
    z = (x - w.mean) @ w.projection
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(6), atol=1e-6)
    # naive: eigendecomposition of the covariance, one column at a time
    c = np.cov(x.T, bias=True)
    values, vectors = np.linalg.eigh(c)
    for col in range(6):
        j = np.argsort(-values)[col]
        expected = vectors[:, j] / np.sqrt(values[j] + 1e-12 * values.max())
        got = w.projection[:, col]
        assert np.allclose(got, expected, atol=1e-8) or np.allclose(got, -expected, atol=1e-8)
    out = w.apply(x.astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, unit(z), atol=1e-4)


def test_whitening_dimension_reduction_keeps_the_largest_variance_and_shrinkage_damps():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) * np.array([10.0, 5.0, 1.0, 0.1, 0.01])
    w = fit_whitening(x, dim=2)
    assert w.projection.shape == (5, 2)
    # the kept directions are the two axes of largest variance
    assert set(np.abs(w.projection).argmax(axis=0)) == {0, 1}
    plain, shrunk = fit_whitening(x), fit_whitening(x, shrinkage=0.5)
    # shrinkage pulls the smallest variance up: its direction is scaled much less
    assert np.abs(shrunk.projection[:, -1]).max() < np.abs(plain.projection[:, -1]).max() / 10
    with pytest.raises(ValueError, match="dim"):
        fit_whitening(x, dim=6)
    with pytest.raises(ValueError, match="shrinkage"):
        fit_whitening(x, shrinkage=1.5)


def test_learned_whitening_whitens_within_label_differences():
    x, labels = clustered(n_labels=20, per=6, dim=8, noise=0.3)
    w = fit_whitening(x, labels=labels, method="learned")
    z = x.astype(np.float64) @ w.projection
    diffs = np.stack(
        [z[a] - z[b] for a in range(len(z)) for b in range(a + 1, len(z)) if labels[a] == labels[b]]
    )
    scatter = diffs.T @ diffs / len(diffs)
    np.testing.assert_allclose(scatter, np.eye(8), atol=1e-5)
    with pytest.raises(ValueError, match="label"):
        fit_whitening(x, method="learned")


# ------------------------------------------------------------------------------ DBA and αQE


def test_database_augment_matches_a_naive_loop_with_duplicates():
    x, _ = clustered(n_labels=6, per=4, dim=8)
    x[5] = x[2]  # an exact duplicate: ties broken by ascending id
    x[9] = x[2]
    k, alpha = 4, 3.0
    got = database_augment(x, k=k, alpha=alpha, chunk_size=7)
    for i in range(len(x)):
        scores = x @ x[i]
        others = [j for j in naive_order(scores) if j != i][: k - 1]
        mixed = x[i].astype(np.float64).copy()
        for j in others:
            mixed += max(float(scores[j]), 0.0) ** alpha * x[j]
        np.testing.assert_allclose(got[i], mixed / np.linalg.norm(mixed), atol=1e-5)
    np.testing.assert_allclose(database_augment(x, k=1), x, atol=1e-6)


def test_dba_of_new_rows_equals_augmenting_the_whole_gallery():
    x, _ = clustered(n_labels=5, per=4, dim=8, seed=3)
    base, new = x[:15], x[15:]
    np.testing.assert_allclose(
        dba_vectors_for(new, base, k=3, alpha=2.0), database_augment(x, 3, 2.0)[15:], atol=1e-6
    )


def test_alpha_query_expansion_matches_a_naive_sum_and_ignores_empty_slots():
    rng = np.random.default_rng(4)
    q = unit(rng.normal(size=(2, 5)))
    g = unit(rng.normal(size=(2, 3, 5)))
    s = np.array([[0.9, 0.5, -0.2], [0.8, -np.inf, -np.inf]], dtype=np.float32)
    got = alpha_query_expansion(q, g, s, alpha=2.0)
    first = q[0] + 0.81 * g[0, 0] + 0.25 * g[0, 1]  # a negative score weighs 0
    second = q[1] + 0.64 * g[1, 0]
    np.testing.assert_allclose(got[0], first / np.linalg.norm(first), atol=1e-6)
    np.testing.assert_allclose(got[1], second / np.linalg.norm(second), atol=1e-6)


def test_top_k_by_score_breaks_ties_by_ascending_column_and_excludes():
    s = np.array([[0.5, 0.9, 0.9, 0.1, 0.9]], dtype=np.float32)
    assert top_k_columns(s, 4).tolist() == [[1, 2, 4, 0]]
    assert top_k_columns(s, 3, exclude=np.array([2])).tolist() == [[1, 4, 0]]


# ------------------------------------------------------------------------------ re-ranking


def naive_k_reciprocal(q, cands, k1, k2, lam):
    """Zhong et al.'s re-ranking written out with Python sets, over the query + candidates."""
    pts = np.concatenate([q[None], cands]).astype(np.float64)
    m = len(pts)
    d = 2 - 2 * np.clip(pts @ pts.T, -1, 1)
    np.fill_diagonal(d, 0)
    order = [sorted(range(m), key=lambda j, i=i: (d[i, j], j)) for i in range(m)]

    def recip(i, k):
        return {j for j in order[i][: k + 1] if i in order[j][: k + 1]}

    half = max(1, round(k1 / 2))
    v = np.zeros((m, m))
    for i in range(m):
        r = recip(i, k1)
        expanded = set(r)
        for j in r:
            h = recip(j, half)
            if len(h & r) > 2 / 3 * len(h):
                expanded |= h
        idx = sorted(expanded)
        w = np.exp(-d[i, idx])
        v[i, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[order[i][:k2]].mean(axis=0) for i in range(m)])
    out = []
    for g in range(1, m):
        jac = 1 - np.minimum(v[0], v[g]).sum() / np.maximum(v[0], v[g]).sum()
        out.append(1 - ((1 - lam) * jac + lam * d[0, g]) / 2)
    return np.array(out)


@pytest.mark.parametrize("k1,k2,lam", [(4, 3, 0.3), (6, 1, 0.0), (3, 2, 1.0)])
def test_k_reciprocal_rerank_matches_a_naive_implementation(k1, k2, lam):
    x, _ = clustered(n_labels=4, per=5, dim=8, seed=5)
    q, cands = x[0], x[1:]
    got = k_reciprocal_rerank(q, cands, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(got, naive_k_reciprocal(q, cands, k1, k2, lam), atol=1e-5)
    if lam == 1.0:  # the original cosines
        np.testing.assert_allclose(got, cands @ q, atol=1e-5)


def _circle(degrees: list[float]) -> np.ndarray:
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def _exact_search(gallery: np.ndarray):
    def search(x, k):
        s = x @ gallery.T
        ids = np.stack([naive_order(row)[:k] for row in s])
        return np.take_along_axis(s, ids, axis=1), ids

    return search


def test_reranking_fixes_a_constructed_case_and_keeps_ties_in_id_order():
    # the query (angle 0) has its matches at -11, -12, -13 degrees; a distractor at +10 is
    # nearer, but its own neighbours are its cluster at 16-18 degrees, not the query: it is
    # not a k-reciprocal neighbour of the query and re-ranking moves it down
    gallery = _circle([-11, -12, -13, 10, 16, 17, 18])
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert naive_order(gallery @ q[0])[0] == 3  # the distractor wins plainly
    rerank = Rerank(top_n=7, k1=3, k2=1)
    scores, ids, _ = search_with_steps(
        q, 7, _exact_search(gallery), lambda f: gallery[f], rerank=rerank
    )
    assert ids[0, :3].tolist() == [0, 1, 2] and ids[0, 3] == 3
    assert np.all(np.diff(scores[0]) <= 0)
    # exact duplicates get equal scores and come out in ascending id order
    dup = np.concatenate([gallery, gallery[[0, 3]]])  # ids 7 = copy of 0, 8 = copy of 3
    scores, ids, _ = search_with_steps(q, 9, _exact_search(dup), lambda f: dup[f], rerank=rerank)
    order = ids[0].tolist()
    assert order.index(0) + 1 == order.index(7) and order.index(3) + 1 == order.index(8)
    assert scores[0, order.index(0)] == scores[0, order.index(7)]


# ------------------------------------------------------------------------------ TTA


def test_tta_averages_the_views_and_a_flip_invariant_model_ignores_the_flip():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 16, 16)

    def embed(x):
        return torch.nn.functional.normalize(x.mean(dim=(-1,)).flatten(1)[:, :8], dim=-1)

    got = tta_embed(embed, images, (1.0, 0.5), flip=False)
    half = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear")
    expected = torch.nn.functional.normalize(embed(images) + embed(half), dim=-1)
    torch.testing.assert_close(got, expected)
    # a row mean is unchanged by a horizontal flip
    torch.testing.assert_close(tta_embed(embed, images, (1.0,), flip=True), embed(images))


# ------------------------------------------------------------------------------ config


def test_postprocess_config_orders_steps_and_names_bad_settings():
    steps = Postprocess.from_dict({"aqe": {"k": 2}, "tta": None, "whiten": {}})
    assert steps.steps == ["tta", "whiten", "aqe"]
    assert steps.up_to("whiten").steps == ["tta", "whiten"]
    assert Postprocess.from_dict(steps.to_dict()) == steps
    with pytest.raises(ValueError, match="unknown postprocess step 'qe'"):
        Postprocess.from_dict({"qe": {}})
    with pytest.raises(ValueError, match=r"unknown settings \['kk'\] of postprocess.dba"):
        Postprocess.from_dict({"dba": {"kk": 3}})
    with pytest.raises(ValueError, match="postprocess.aqe.k"):
        Postprocess.from_dict({"aqe": {"k": 0}})
    with pytest.raises(ValueError, match="fit_on=train"):
        Whiten(method="learned", fit_on="gallery")


# ------------------------------------------------------------------------------ evaluator


def naive_evaluate(xq, xg, labels_q, labels_g, loo, k):
    """recall@k and MAP@R of a plain exhaustive ranking (ties by ascending id), self left out."""
    hits, aps = [], []
    for i in range(len(xq)):
        scores = xg @ xq[i]
        order = [j for j in naive_order(scores) if not (loo and j == i)]
        rel = [labels_g[j] == labels_q[i] for j in order]
        r = sum(rel)
        if r == 0:
            continue
        hits.append(any(rel[:k]))
        found, total = 0, 0.0
        for pos, ok in enumerate(rel[:r], 1):
            if ok:
                found += 1
                total += found / pos
        aps.append(total / r)
    return float(np.mean(hits)), float(np.mean(aps))


def test_evaluator_with_whiten_dba_aqe_equals_the_steps_done_by_hand():
    x, labels = clustered(n_labels=15, per=4, dim=12, noise=0.9, seed=7)
    steps = Postprocess(
        whiten=Whiten(fit_on="gallery", shrinkage=0.2), dba=DBA(k=3), aqe=AQE(k=2, alpha=1.0)
    )
    result = evaluate_embeddings(
        x, labels, ks=[1, 2], metrics=["recall", "map@r"], postprocess=steps
    )
    # by hand: whiten everything, augment the gallery, expand each query over the
    # augmented gallery without itself, then rank that gallery
    w = fit_whitening(x, shrinkage=0.2)
    xw = w.apply(x)
    gallery = database_augment(xw, 3, 3.0)
    expanded = []
    for i in range(len(xw)):
        s = gallery @ xw[i]
        first = [j for j in naive_order(s) if j != i][:2]
        v = xw[i].astype(np.float64) + sum(max(s[j], 0) * gallery[j] for j in first)
        expanded.append(v / np.linalg.norm(v))
    expanded = np.array(expanded, dtype=np.float32)
    r1, mapr = naive_evaluate(expanded, gallery, labels, labels, loo=True, k=1)
    assert result.metrics["recall@1"] == pytest.approx(r1, abs=1e-9)
    assert result.metrics["map@r"] == pytest.approx(mapr, abs=1e-6)
    assert result.index["postprocess"] == steps.to_dict()
    # the plain evaluation differs, so the steps did something
    plain = evaluate_embeddings(x, labels, ks=[1], metrics=["recall", "map@r"])
    assert plain.metrics["map@r"] != pytest.approx(mapr, abs=1e-6)


def test_evaluator_rerank_and_full_map_agree_with_the_reranked_order():
    x, labels = clustered(n_labels=10, per=4, dim=8, noise=0.8, seed=8)
    q, g = x[::4], np.delete(x, np.arange(0, len(x), 4), axis=0)
    lq, lg = labels[::4], np.delete(labels, np.arange(0, len(x), 4))
    rerank = Rerank(top_n=len(g), k1=4, k2=2)
    result = evaluate_embeddings(
        q,
        lq,
        g,
        lg,
        ks=[1, 3],
        metrics=["recall", "map@r", "map"],
        postprocess=Postprocess(rerank=rerank),
    )
    ids = []
    for i in range(len(q)):
        new = k_reciprocal_rerank(q[i], g, rerank.k1, rerank.k2, rerank.lambda_value)
        ids.append(naive_order(new))
    ids = np.array(ids)
    got_labels = lg[ids]
    r = np.array([(lg == lab).sum() for lab in lq])
    assert result.metrics["recall@1"] == pytest.approx(recall_at_k(got_labels, lq, 1).mean())
    assert result.metrics["map@r"] == pytest.approx(map_at_r(got_labels, lq, r).mean())
    # full AP over the whole (re-ranked) ranking
    aps = []
    for row, lab in zip(got_labels, lq, strict=True):
        hits = np.flatnonzero(row == lab) + 1
        aps.append(np.mean(np.arange(1, len(hits) + 1) / hits))
    assert result.metrics["map"] == pytest.approx(float(np.mean(aps)))


def test_evaluator_refuses_a_train_fitted_whitening_it_was_not_given():
    x, labels = clustered()
    with pytest.raises(ValueError, match="fit_on=train"):
        evaluate_embeddings(x, labels, postprocess=Postprocess(whiten=Whiten()))
    # given one, it is used as is
    w = fit_whitening(x[:30])
    result = evaluate_embeddings(
        x, labels, ks=[1], metrics=["recall"], postprocess=Postprocess(whiten=Whiten()), whitening=w
    )
    by_hand = evaluate_embeddings(w.apply(x), labels, ks=[1], metrics=["recall"])
    assert result.metrics == by_hand.metrics


def test_tta_config_round_trips():
    assert TTA().views == 6 and TTA(scales=(1.0,), flip=False).views == 1
    with pytest.raises(ValueError, match="tta.scales"):
        TTA(scales=())

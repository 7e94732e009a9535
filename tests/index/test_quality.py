"""knn_recall: hand-worked examples, and against real approximate indexes."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex, knn_recall
from tests.index.synthetic import brute_force, unit


def test_hand_examples():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    assert knn_recall(exact, exact) == 1.0
    assert knn_recall(exact[:, ::-1], exact) == 1.0  # order within a row does not matter
    assert knn_recall(np.array([[0, 9, 9], [5, 3, -1]]), exact) == pytest.approx(
        (1 / 3 + 2 / 3) / 2
    )
    assert knn_recall(np.array([[-1, -1, -1], [7, 8, 9]]), exact) == 0.0
    assert knn_recall(np.array([[0], [3]]), exact) == pytest.approx(1 / 3)  # found fewer
    assert knn_recall(np.array([[2, 1, 0, 7]]), np.array([[0, 1, -1]])) == pytest.approx(2 / 3)


def test_chunking_gives_the_same_answer(monkeypatch):
    import retrieval.index.embedding_index as quality

    rng = np.random.default_rng(0)
    exact = np.argsort(rng.random((50, 20)), axis=1)[:, :10]
    found = rng.integers(-1, 20, (50, 10))
    whole = knn_recall(found, exact)
    monkeypatch.setattr(quality, "_CHUNK_ELEMENTS", 7)
    assert knn_recall(found, exact) == whole
    loop = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert whole == pytest.approx(loop)


def test_errors():
    ok = np.array([[0, 1]])
    for found, exact, match in [
        (ok[0], ok, "found_ids must be 2-D"),
        (ok, ok.astype(float), "exact_ids must be an integer"),
        (np.array([[0, 1], [1, 2]]), ok, "2 rows but exact_ids has 1"),
        (ok[:0], ok[:0], "at least one query"),
        (ok, np.array([[1, 1]]), "repeats an id"),
    ]:
        with pytest.raises(ValueError, match=match):
            knn_recall(found, exact)


def test_ivf_probing_all_lists_has_recall_one_and_one_probe_less():
    rng = np.random.default_rng(1)
    xb, xq = unit(rng.standard_normal((2000, 32))), unit(rng.standard_normal((50, 32)))
    _, exact = brute_force(xq, xb, 10)
    index = EmbeddingIndex(32, "IVF32,Flat", use_gpu=False, search_params="nprobe=32")
    index.add(xb)
    assert knn_recall(index.search(xq, 10)[1], exact) == 1.0
    one = EmbeddingIndex(32, "IVF32,Flat", use_gpu=False, search_params="nprobe=1")
    one.add(xb)
    assert 0 < knn_recall(one.search(xq, 10)[1], exact) < 0.9

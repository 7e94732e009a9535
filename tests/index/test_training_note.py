"""Training an index on fewer vectors than FAISS's k-means wants: one line of ours that names
the shortfall and the fix, instead of FAISS's own line per k-means run (33 for IVF256,PQ32)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex
from tests.index.synthetic import unit

NOTE = "retrieval.index.embedding_index"


def xb(n: int, dim: int = 64) -> np.ndarray:
    return unit(np.random.default_rng(0).standard_normal((n, dim)))


def test_few_training_vectors_are_said_once_in_our_words(caplog, capfd) -> None:
    index = EmbeddingIndex(64, "IVF256,PQ32np")
    with caplog.at_level(logging.WARNING, logger=NOTE):
        index.train(xb(1440))
    out, err = capfd.readouterr()
    assert "WARNING clustering" not in out + err  # FAISS's own lines
    notes = [r.getMessage() for r in caplog.records if r.name == NOTE]
    assert len(notes) == 1, notes
    assert "'IVF256,PQ32np' is trained on 1440 vectors" in notes[0]
    assert "9984 for its 256 inverted lists" in notes[0]
    assert "IVF32 and PQ32x5 suit 1440 vectors" in notes[0]
    assert index.is_trained
    index.add(xb(1440))
    assert index.search(xb(1440)[:3], 1)[1][:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("factory", ["IVF4,Flat", "Flat", "HNSW8"])
def test_enough_training_vectors_say_nothing(factory: str, caplog, capfd) -> None:
    with caplog.at_level(logging.WARNING, logger=NOTE):
        EmbeddingIndex(64, factory).train(xb(4 * 39))
    assert not [r for r in caplog.records if r.name == NOTE]
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err


def test_the_suggested_index_trains_without_a_note(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=NOTE):
        EmbeddingIndex(64, "IVF32,PQ32x5np").train(xb(1440))
    assert not [r for r in caplog.records if r.name == NOTE]

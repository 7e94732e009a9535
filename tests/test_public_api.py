"""The package's public API: the names ``retrieval.__all__`` lists import from the package
itself, and importing the package alone loads neither PyTorch nor FAISS."""

from __future__ import annotations

import subprocess
import sys

import pytest

import retrieval


def test_the_public_names_import_from_the_package():
    from retrieval import Embedder, EmbeddingIndex, Retriever, evaluate_embeddings

    assert Retriever.__name__ == "Retriever"
    assert Embedder.__name__ == "Embedder"
    assert EmbeddingIndex.__name__ == "EmbeddingIndex"
    assert callable(evaluate_embeddings)
    assert sorted(retrieval.__all__) == sorted(retrieval._HOMES)
    for name in retrieval.__all__:
        assert getattr(retrieval, name).__name__ == name
    assert set(retrieval.__all__) <= set(dir(retrieval))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Retreiver'"):
        retrieval.Retreiver  # noqa: B018


def test_importing_the_package_loads_no_heavy_library():
    code = "import sys, retrieval; print(sorted({'torch', 'faiss'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

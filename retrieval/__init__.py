"""Learned image retrieval: train, evaluate, export and serve embeddings.

The public API, importable from the package itself::

    from retrieval import Retriever, Embedder, EmbeddingIndex, evaluate_embeddings

- :class:`Retriever`: an exported bundle opened for search, add, remove and duplicates.
- :class:`Embedder`: a backbone with its pooling and head, images to unit embeddings.
- :class:`EmbeddingIndex`: the FAISS index of unit embeddings (inner product, ties by id).
- :func:`evaluate_embeddings`: recall@k, MAP@R, mAP and the rest from embeddings and labels.
- :func:`find_duplicates`: exact and near copies in a folder, grouped, keepers chosen.
- :func:`score_bundle`: a bundle's copy-detection or retrieval figures, as users search it.
- :class:`Hit`, :class:`AddReport`, :class:`RetrievalResult`: what those return.

Each name is imported on first use, so ``import retrieval.infra`` (or the command line's
``--help``) does not load PyTorch and FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval.evaluation import RetrievalResult, evaluate_embeddings
    from retrieval.index import EmbeddingIndex
    from retrieval.models import Embedder
    from retrieval.search import AddReport, Hit, Retriever
    from retrieval.search.duplicate_finder import find_duplicates
    from retrieval.search.score import score_bundle

_HOMES = {
    "AddReport": "retrieval.search",
    "Embedder": "retrieval.models",
    "EmbeddingIndex": "retrieval.index",
    "Hit": "retrieval.search",
    "RetrievalResult": "retrieval.evaluation",
    "Retriever": "retrieval.search",
    "evaluate_embeddings": "retrieval.evaluation",
    "find_duplicates": "retrieval.search.duplicate_finder",
    "score_bundle": "retrieval.search.score",
}

__all__ = [
    "AddReport",
    "Embedder",
    "EmbeddingIndex",
    "Hit",
    "RetrievalResult",
    "Retriever",
    "evaluate_embeddings",
    "find_duplicates",
    "score_bundle",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

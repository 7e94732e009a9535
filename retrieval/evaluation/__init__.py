"""Evaluation: embeddings -> EmbeddingIndex -> ranked results -> metrics."""

from retrieval.evaluation.core import (
    ALL_METRICS,
    DEFAULT_METRICS,
    evaluate_embeddings,
    evaluate_protocol,
    search_excluding_self,
)
from retrieval.evaluation.result import RetrievalResult

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "RetrievalResult",
    "evaluate_embeddings",
    "evaluate_protocol",
    "search_excluding_self",
]

"""Evaluation: embeddings -> EmbeddingIndex -> ranked results -> metrics."""

from retrieval.evaluation.evaluate import (
    ALL_METRICS,
    DEFAULT_METRICS,
    RetrievalResult,
    evaluate_embeddings,
    evaluate_protocol,
)
from retrieval.evaluation.gallery_search import search_excluding_self
from retrieval.evaluation.metrics import (
    average_precision,
    map_at_k,
    map_at_r,
    micro_average_precision,
    nmi,
    precision_at_k,
    r_precision,
    recall_at_k,
)

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "RetrievalResult",
    "average_precision",
    "evaluate_embeddings",
    "evaluate_protocol",
    "map_at_k",
    "map_at_r",
    "micro_average_precision",
    "nmi",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
    "search_excluding_self",
]

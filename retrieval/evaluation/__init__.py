"""Evaluation: embeddings -> EmbeddingIndex -> ranked results -> metrics."""

from retrieval.evaluation.ap import average_precision, micro_average_precision
from retrieval.evaluation.clustering import nmi
from retrieval.evaluation.core import (
    ALL_METRICS,
    DEFAULT_METRICS,
    evaluate_embeddings,
    evaluate_protocol,
)
from retrieval.evaluation.metrics import (
    map_at_k,
    map_at_r,
    precision_at_k,
    r_precision,
    recall_at_k,
)
from retrieval.evaluation.result import RetrievalResult
from retrieval.evaluation.search import search_excluding_self

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

"""The value object an evaluation returns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RetrievalResult"]


def _checked_metrics(metrics: Mapping[str, Any], what: str) -> dict[str, float]:
    clean: dict[str, float] = {}
    for name, value in dict(metrics).items():
        if not isinstance(name, str):
            raise ValueError(f"{what} names must be str, got {name!r}")
        v = float(value)
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{what} {name!r} must be a finite value in [0, 1], got {v}")
        clean[name] = v
    return clean


@dataclass(frozen=True)
class RetrievalResult:
    """Scores of one evaluation.

    Attributes:
        metrics: metric name -> mean over the scored queries, each a finite float in [0, 1]
            (``recall@{k}``, ``precision@{k}``, ``map@{k}``, ``map@r``, ``r_precision``,
            ``map``, ``nmi``, and ``micro_ap@{k}``, pooled over all queries including those
            left out; see :func:`retrieval.evaluation.evaluate_embeddings`). With an
            approximate index these are the values through that index; with search-time
            steps, the values of the search with them.
        num_queries: number of queries scored (>= 1).
        num_excluded: number of queries with no relevant gallery item, left out of the means.
        exact_metrics: with an approximate index, the same metrics through exact search;
            ``None`` when the search was exact.
        index: how the search was done: ``factory``, ``search_params``, ``bytes_per_vector``,
            with an approximate index ``knn_recall@{k}`` (the share of the exact top k that
            the index finds), and with search-time steps ``postprocess`` (their settings).
        query_rows: (num_queries,) positions, in the query set, of the scored queries.
        per_query: metric name -> (num_queries,) per-query values (no ``nmi``: it is a
            property of the whole set).
        neighbor_ids: (num_queries, n) gallery positions of each scored query's first results
            through the index, best first (-1 where the index found none).
        neighbor_scores: (num_queries, n) their inner-product scores (re-ranking scores
            when the steps re-rank).
    """

    metrics: dict[str, float]
    num_queries: int
    num_excluded: int
    exact_metrics: dict[str, float] | None = None
    index: dict[str, Any] = field(default_factory=dict)
    query_rows: np.ndarray | None = field(default=None, compare=False, repr=False)
    per_query: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    neighbor_ids: np.ndarray | None = field(default=None, compare=False, repr=False)
    neighbor_scores: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _checked_metrics(self.metrics, "metric"))
        if self.exact_metrics is not None:
            exact = _checked_metrics(self.exact_metrics, "exact metric")
            object.__setattr__(self, "exact_metrics", exact)
        for name in ("num_queries", "num_excluded"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
            object.__setattr__(self, name, int(n))
        if self.num_queries == 0:
            raise ValueError("num_queries must be >= 1")
        for name, values in self.per_query.items():
            if np.shape(values) != (self.num_queries,):
                raise ValueError(
                    f"per_query[{name!r}] must have shape ({self.num_queries},), "
                    f"got {np.shape(values)}"
                )

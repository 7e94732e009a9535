"""Score an exported bundle the way a user searches it: every query image goes through
:meth:`retrieval.search.retriever.Retriever.search` (the bundle's own preprocessing, runtime
and index), and the hits' labels, stored with the bundle's items at export, decide what is relevant.

The metric functions are those of :mod:`retrieval.evaluation.metrics` and
:mod:`retrieval.evaluation.metrics`, with the conventions of
:func:`retrieval.evaluation.evaluate_embeddings`: queries whose label no bundle item has are
left out of the recall values (and counted), but their hits still enter ``micro_ap@{k}`` as
false positives.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.evaluation.metrics import micro_average_precision, recall_at_k
from retrieval.infra.checks import positive_int

if TYPE_CHECKING:
    from retrieval.search import Retriever

__all__ = ["bundle_label_counts", "score_bundle"]

#: A query to score: (image path, label of its relevant items, edit kind or "").
Query = tuple[str | os.PathLike[str], str, str]


def bundle_label_counts(retriever: Retriever, chunk_size: int = 10_000) -> Counter[str]:
    """How many active items of the bundle carry each label (unlabelled items not counted)."""
    from retrieval.bundle.items import IndexedItems

    if not isinstance(retriever.items, IndexedItems):
        raise ValueError(
            "scoring counts labels in the bundle's own item store: load the bundle without a "
            f"search backend (this one searches {retriever.items.describe()['kind']})"
        )
    store = retriever.items.store
    counts: Counter[str] = Counter()
    ids = store.active_ids()
    for start in range(0, len(ids), chunk_size):
        items = store.get(ids[start : start + chunk_size].tolist())
        counts.update(item.label for item in items if item.label is not None)
    return counts


def _num_relevant(retriever: Retriever, labels: list[str]) -> np.ndarray:
    """How many of the bundle's items have each query label; some must."""
    counts = bundle_label_counts(retriever)
    num_relevant = np.array([counts.get(label, 0) for label in labels], dtype=np.int64)
    if not (num_relevant > 0).any():
        raise ValueError(
            f"none of the {len(labels)} query labels is a label of the bundle's items: "
            "check that the bundle was exported from the manifest's gallery"
        )
    return num_relevant


def _result_codes(
    hits: Sequence[Sequence[Any]], codes: dict[str, int], cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, cols) label codes (-1: a label no query has, or none) and scores of the results,
    empty slots -1 and -inf."""
    neighbor = np.full((len(hits), cols), -1, dtype=np.int64)
    scores = np.full((len(hits), cols), -np.inf)
    for row, found in enumerate(hits):
        for col, hit in enumerate(found[:cols]):
            neighbor[row, col] = codes.get(hit.label, -1) if hit.label is not None else -1
            scores[row, col] = hit.score
    return neighbor, scores


def score_bundle(
    retriever: Retriever,
    queries: Sequence[Query],
    k: int = 10,
    batch_size: int = 32,
    rerank: bool | None = None,
) -> dict[str, Any]:
    """Search every query image in the bundle and score the results.

    ``queries``: ``(path, label, edit)`` per query; ``edit`` groups the per-edit recall (any
    string, e.g. the copy-detection edit kind; "" for none). ``k`` results per query,
    ``batch_size`` images per model call, ``rerank`` on or off (``None``: as exported).

    Returns:
        ``queries`` (number searched), ``scored`` (those whose label is in the bundle),
        ``excluded``, ``k``, ``recall@1``, ``recall@{k}``, ``micro_ap@{k}`` (over all
        ``sum R`` relevant items of the scored queries), ``recall@1_by_edit`` (edit ->
        recall@1 over its scored queries), ``edit_counts`` (edit -> scored queries),
        ``seconds`` (searching, images decoded and embedded included) and
        ``seconds_per_query``.

    Raises:
        ValueError: no queries, k < 1, or no query whose label is in the bundle.
        ImageLoadError: a query image that cannot be read (named).
    """
    if not queries:
        raise ValueError("no queries to score")
    positive_int(k, "k")
    labels = [str(label) for _, label, _ in queries]
    num_relevant = _num_relevant(retriever, labels)
    scored = num_relevant > 0
    start = time.perf_counter()
    # Retriever decodes and embeds batch_size images at a time
    hits = retriever.search(
        [str(path) for path, _, _ in queries], k=k, batch_size=batch_size, rerank=rerank
    )
    seconds = time.perf_counter() - start

    cols = max(1, min(k, len(retriever)))
    codes = {label: code for code, label in enumerate(sorted(set(labels)))}
    neighbor, scores = _result_codes(hits, codes, cols)
    query_codes = np.array([codes[label] for label in labels], dtype=np.int64)
    relevant = neighbor == query_codes[:, None]
    r1 = recall_at_k(neighbor[scored], query_codes[scored], 1)
    edits = np.array([str(edit) for _, _, edit in queries])[scored]
    by_edit = {str(e): float(r1[edits == e].mean()) for e in sorted(set(edits.tolist()))}
    return {
        "queries": len(queries),
        "scored": int(scored.sum()),
        "excluded": int((~scored).sum()),
        "k": int(k),
        "recall@1": float(r1.mean()),
        f"recall@{k}": float(recall_at_k(neighbor[scored], query_codes[scored], cols).mean()),
        f"micro_ap@{k}": micro_average_precision(scores, relevant, int(num_relevant.sum())),
        "recall@1_by_edit": by_edit,
        "edit_counts": {e: int((edits == e).sum()) for e in by_edit},
        "seconds": seconds,
        "seconds_per_query": seconds / len(queries),
    }

"""Searching the collection under the house rule: inner products of unit vectors, equal
scores by ascending id. Milvus orders ties arbitrarily, so a search asks for more than ``k``
and searches deeper while a group of equal scores straddles the ``k``-th place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_TOPK", "ranked_search", "search_params"]

MAX_TOPK = 16_384  # Milvus's largest search limit


def search_params(index_type: str, params: dict[str, Any], limit: int) -> dict[str, Any]:
    """Search parameters for an index as ``describe_index`` reports it."""
    kind = index_type.upper()
    if kind.startswith("HNSW"):
        return {"ef": max(limit, 128)}
    if kind.startswith("IVF"):
        nlist = int(params.get("nlist", 1024))
        return {"nprobe": min(nlist, max(16, nlist // 64))}
    return {}


def ranked_search(
    client: Any,
    collection: str,
    index: dict[str, Any],
    xq: np.ndarray,
    k: int,
    where: str,
    fields: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """``(scores, ids, rows)`` of the ``k`` (at most :data:`MAX_TOPK`) best rows of
    ``collection`` that pass the filter ``where`` for each row of ``xq``, best first, equal
    scores by ascending id, and the ``fields`` of every row found (by id; the same request,
    so no second round trip reads them); ``index`` is the collection's vector index
    description."""
    k = min(int(k), MAX_TOPK)
    rows: dict[int, dict[str, Any]] = {}
    found: list[list[tuple[float, int]]] = [[] for _ in range(len(xq))]
    todo = list(range(len(xq)))
    want = min(MAX_TOPK, k + max(8, k // 4))
    while todo:
        answer = client.search(
            collection,
            data=[xq[row] for row in todo],
            limit=want,
            filter=where,
            output_fields=list(fields),
            search_params={
                "metric_type": "IP",
                "params": search_params(index["index_type"], index.get("params", {}), want),
            },
            consistency_level="Strong",
        )
        left = []
        for row, hits in zip(todo, answer, strict=True):
            pairs = sorted((-float(h["distance"]), int(h["id"])) for h in hits)
            if fields:
                rows.update((int(h["id"]), {**h["entity"], "id": int(h["id"])}) for h in hits)
            found[row] = pairs
            straddles = len(pairs) > k and pairs[k - 1][0] == pairs[-1][0]
            if straddles and len(pairs) == want and want < MAX_TOPK:
                left.append(row)  # equal scores may go on past what was returned
        todo, want = left, min(MAX_TOPK, want * 4)
    width = max((min(k, len(p)) for p in found), default=0)
    scores = np.full((len(xq), width), -np.inf, np.float32)
    ids = np.full((len(xq), width), -1, np.int64)
    for row, pairs in enumerate(found):
        best = pairs[:width]
        scores[row, : len(best)] = [-s for s, _ in best]
        ids[row, : len(best)] = [i for _, i in best]
    return scores, ids, rows

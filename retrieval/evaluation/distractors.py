"""Distractors added to a gallery without holding them: a large set of images known to be
relevant to no query (Revisited Oxford/Paris' R1M) that every query's ranking must push down.

The distractors come as blocks of vectors (the shards of :mod:`retrieval.index.shards`, read
one at a time). For each query and each of its chosen gallery items (the ones its ground truth
lists), :func:`scan_distractors` counts the distractors that score strictly above the item:
added to the item's rank within the gallery, that is its rank in the gallery with the
distractors appended after it. Distractor numbers come after every gallery id, so an exact tie
between a distractor and a gallery item ranks the gallery item first (ascending id, as
everywhere in the project); ties among distractors rank by ascending distractor number.

Scores are float32 inner products computed with torch, as in
:mod:`retrieval.evaluation.ranking`. Memory: one block, its (chunk_size, block rows) scores
and their sorted copy at a time; never a query x all-distractors matrix nor all distractors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from retrieval.evaluation.evaluate import l2_normalised
from retrieval.infra.checks import checked_vectors, positive_int
from retrieval.infra.ties import by_score_then_id, top_k_columns
from retrieval.postprocess import Postprocess

__all__ = ["DistractorScan", "check_distractor_steps", "merge_top", "scan_distractors"]


@dataclass(frozen=True)
class DistractorScan:
    """What one pass over the distractors found.

    Attributes:
        above: per query, (len(targets[q]),) int64: the distractors scoring strictly above
            each target score.
        top_scores: (nq, keep) float32: each query's best distractor scores, best first;
            ``-inf`` where there are fewer than ``keep`` distractors.
        top_ids: (nq, keep) int64: their distractor numbers (0-based, in block order); -1
            where there are fewer.
        count: the distractors scanned (rows of all blocks).
    """

    above: list[np.ndarray]
    top_scores: np.ndarray
    top_ids: np.ndarray
    count: int


def check_distractor_steps(steps: Postprocess | None) -> None:
    """Refuse the search-time steps that need every distractor's neighbours.

    Raises:
        ValueError: ``steps`` holds DBA or αQE (whitening is applied to the distractors;
            re-ranking and score normalisation are not part of the benchmarks that use them).
    """
    if steps is not None and (steps.dba is not None or steps.aqe is not None):
        raise ValueError(
            "postprocess dba and aqe are not supported with distractors (+distractors=...): "
            "they need every distractor's neighbours; drop them (whiten is applied to the "
            "distractors too), or drop the distractors"
        )


def merge_top(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], keep: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` best of several (nq, k_i) result lists per row, best first, equal scores
    by ascending id; entries with id -1 (none found) come last.

    Returns:
        ``(scores, ids)``, each (nq, min(keep, sum of k_i)).
    """
    s = np.concatenate([np.asarray(x, dtype=np.float32) for x in scores], axis=1)
    i = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids], axis=1)
    s, i = by_score_then_id(np.where(i < 0, -np.inf, s).astype(np.float32), i)
    return s[:, :keep], i[:, :keep]


def _searched(
    block: np.ndarray, number: int, dim: int, transform: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """One block checked, L2-normalised and moved into the searched space by ``transform``."""
    name = f"distractor block {number}"
    x = checked_vectors(block, name, dim=dim, integers=False)
    if x.shape[0] == 0:
        return x
    if not x.flags.writeable:  # a memory-mapped shard: torch wants an array of its own
        x = x.copy()
    x = l2_normalised({name: x}, stacklevel=4)[name]
    return x if transform is None else np.ascontiguousarray(transform(x), dtype=np.float32)


def _count_above(
    block_scores: np.ndarray, targets: list[np.ndarray], above: list[np.ndarray]
) -> None:
    """Add to ``above[r]`` how many of row r's scores are strictly above each of its targets."""
    ranked = np.sort(block_scores, axis=1)
    n = block_scores.shape[1]
    for row, t in enumerate(targets):
        if t.size:
            above[row] += n - np.searchsorted(ranked[row], t, side="right")


def _scan_block(
    x: np.ndarray,
    xd: np.ndarray,
    wanted: list[np.ndarray],
    found: DistractorScan,
    chunk_size: int,
) -> None:
    """Add one searched block (its first row numbered ``found.count``) to ``found``."""
    keep = found.top_ids.shape[1]
    xd_t = torch.from_numpy(xd)
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        s = torch.mm(torch.from_numpy(x[start:stop]), xd_t.T).numpy()
        _count_above(s, wanted[start:stop], found.above[start:stop])
        if keep:
            cols = top_k_columns(s, keep)
            merged = merge_top(
                [found.top_scores[start:stop], np.take_along_axis(s, cols, axis=1)],
                [found.top_ids[start:stop], cols + found.count],
                keep,
            )
            found.top_scores[start:stop], found.top_ids[start:stop] = merged


def scan_distractors(
    xq: np.ndarray,
    targets: Sequence[np.ndarray],
    blocks: Iterable[np.ndarray],
    keep: int = 0,
    chunk_size: int = 512,
    dim: int | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> DistractorScan:
    """Count, per query and target score, the distractors scoring strictly above it, and keep
    each query's ``keep`` best distractors; one block at a time (see the module docstring).

    Args:
        xq: (nq, d) float32 queries, in the searched space (after whitening).
        targets: per query, float32 scores of its chosen gallery items (any order).
        blocks: the distractors' (n_i, dim) float vectors, iterated once, in order; block
            rows are numbered consecutively from 0.
        keep: best distractors to keep per query (0: none).
        chunk_size: queries per matrix product, >= 1.
        dim: the width of the blocks (default: d); differs from d when ``transform`` maps
            them (whitening that reduces the dimension).
        transform: the search-time map of the gallery's vectors (a whitening's ``apply``),
            applied to each L2-normalised block; it must give (n_i, d) rows.

    Raises:
        ValueError: bad queries or blocks (shape, non-finite values, zero rows), a block
            that ``transform`` does not map to d, ``len(targets) != nq``, chunk_size < 1.
    """
    x = checked_vectors(xq, "xq", integers=False)
    nq, d = x.shape
    if len(targets) != nq:
        raise ValueError(f"targets must hold one array per query ({nq}), got {len(targets)}")
    positive_int(chunk_size, "chunk_size")
    wanted = [np.asarray(t, dtype=np.float32).reshape(-1) for t in targets]
    keep = max(0, int(keep))
    found = DistractorScan(
        [np.zeros(t.size, dtype=np.int64) for t in wanted],
        np.full((nq, keep), -np.inf, dtype=np.float32),
        np.full((nq, keep), -1, dtype=np.int64),
        0,
    )
    for number, block in enumerate(blocks):
        xd = _searched(block, number, d if dim is None else int(dim), transform)
        if xd.shape[0] == 0:
            continue
        if xd.shape[1] != d:
            raise ValueError(
                f"distractor block {number} has dim {xd.shape[1]} once searched, {d} wanted"
            )
        _scan_block(x, xd, wanted, found, chunk_size)
        found = replace(found, count=found.count + xd.shape[0])
    return found

"""The scoring rules of the Revisited Oxford and Paris benchmarks (Radenović et al., CVPR 2018),
as revisitop's ``compute_map`` applies them and every paper that reports on them uses them.

Each query lists its gallery items as ``easy``, ``hard`` and ``junk``. Three setups are scored:

====== =================== ======================
setup  positives           junk (left out)
====== =================== ======================
easy   easy                junk + hard
medium easy + hard         junk
hard   hard                junk + easy
====== =================== ======================

Per query and setup, on the query's full ranking of the gallery:

1. junk is removed from the ranking before anything is counted: a positive's 0-based position
   ``p`` becomes ``p - (number of junk items strictly before it)``;
2. AP is the trapezoidal area under the precision-recall curve: each positive, the j-th
   (0-based) found at 0-based position ``p``, adds ``(P0 + P1) / (2 * n)`` with
   ``P0 = j / p`` (1 when ``p == 0``), ``P1 = (j + 1) / (p + 1)`` and ``n`` the number of
   positives the ground truth lists (found or not);
3. mP@k divides by ``min(k, rank of the last positive)`` (1-based, after the junk removal):
   ``kq = min(max rank, k)`` and ``mP@k = (positives ranked <= kq) / kq``;
4. a query with no positive in a setup is left out of that setup's means.

Rankings here are by inner product, descending, equal scores by ascending gallery id, as
everywhere in the project (``retrieval.evaluation.ranking``). This module is pure math on
positions; :mod:`retrieval.evaluation.listed` finds the positions through a search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "KAPPAS",
    "SETUPS",
    "RevisitedScores",
    "positions_in_ranking",
    "revisited_map",
    "revisited_query",
    "revisited_rankings",
    "setup_lists",
    "trapezoid_ap",
    "without_junk",
]

#: The setups, in the order papers print them.
SETUPS = ("easy", "medium", "hard")
#: The k of mP@k that revisitop's example and the papers report.
KAPPAS = (1, 5, 10)


def _ids(values: object, name: str) -> np.ndarray:
    """A 1-D int64 array of gallery ids (any integer sequence; empty allowed)."""
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D sequence of integer ids, got {array.dtype} {array.shape}"
        )
    return array.astype(np.int64)


def setup_lists(
    easy: Sequence[int] | np.ndarray,
    hard: Sequence[int] | np.ndarray,
    junk: Sequence[int] | np.ndarray,
    setup: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, junk)`` gallery ids of one query in ``setup`` (easy, medium or hard).

    Raises:
        ValueError: an unknown setup, or ids that are not 1-D integers.
    """
    e, h, j = _ids(easy, "easy"), _ids(hard, "hard"), _ids(junk, "junk")
    if setup == "easy":
        return e, np.concatenate([j, h])
    if setup == "medium":
        return np.concatenate([e, h]), j
    if setup == "hard":
        return h, np.concatenate([j, e])
    raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")


def without_junk(positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives once the junk is taken out of the ranking.

    Args:
        positives: (n,) sorted 0-based positions of the positives in the ranking.
        junk: (m,) sorted 0-based positions of the junk items in it.

    Returns:
        (n,) int64: each position minus the junk positions strictly before it. An item listed
        both as positive and as junk sits at one position and does not move itself.
    """
    pos = np.asarray(positives, dtype=np.int64)
    bad = np.asarray(junk, dtype=np.int64)
    return pos - np.searchsorted(bad, pos, side="left")


def trapezoid_ap(positions: np.ndarray, num_positives: int) -> float:
    """Trapezoidal average precision of positives found at sorted 0-based ``positions``.

    ``AP = sum_j (P0_j + P1_j) / (2 * num_positives)`` with ``P0_j = j / p_j`` (1 when
    ``p_j == 0``) and ``P1_j = (j + 1) / (p_j + 1)``, j 0-based. Example: positions [0, 2] of 2
    positives give ((1 + 1) + (1/2 + 2/3)) / 4 = 0.7917.

    Args:
        positions: (n,) strictly increasing non-negative ints (after :func:`without_junk`).
        num_positives: the positives the ground truth lists, >= n and >= 1.

    Raises:
        ValueError: ``num_positives < max(1, n)``.
    """
    p = np.asarray(positions, dtype=np.float64)
    if num_positives < max(1, p.size):
        raise ValueError(f"num_positives={num_positives} must be >= 1 and >= the {p.size} found")
    j = np.arange(p.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.where(p == 0, 1.0, j / p)
    after = (j + 1) / (p + 1)
    return float(((before + after) / 2.0).sum() / num_positives)


def revisited_query(
    positives: np.ndarray, junk: np.ndarray, num_positives: int, kappas: Sequence[int] = KAPPAS
) -> tuple[float, np.ndarray]:
    """``(AP, mP@k for each k of kappas)`` of one query in one setup.

    Args:
        positives: sorted 0-based positions of the positives in the full ranking (junk still
            in it).
        junk: sorted 0-based positions of the junk items in it.
        num_positives: the positives listed, >= 1.
        kappas: the k of mP@k, each >= 1.

    Returns:
        AP as :func:`trapezoid_ap`, and a float64 (len(kappas),) array with
        ``mP@k = (positives at 1-based rank <= kq) / kq``, ``kq = min(k, last positive's
        rank)``. A ranking holding none of the positives (a truncated one) scores 0.
    """
    pos = without_junk(positives, junk)
    ap = trapezoid_ap(pos, num_positives)
    prs = np.zeros(len(kappas), dtype=np.float64)
    if pos.size:
        ranks = pos + 1
        for n, k in enumerate(kappas):
            kq = min(int(ranks.max()), int(k))
            prs[n] = np.count_nonzero(ranks <= kq) / kq
    return ap, prs


def positions_in_ranking(ranking: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions in ``ranking`` ((n,) gallery ids, best first) of the gallery
    items ``ids``; an id absent from the ranking has none."""
    return np.flatnonzero(np.isin(np.asarray(ranking), _ids(ids, "ids")))


@dataclass(frozen=True)
class RevisitedScores:
    """One setup's scores.

    Attributes:
        map: mean AP over the scored queries (NaN when none has a positive).
        aps: (nq,) AP per query; NaN for a query with no positive (left out).
        mp: (len(kappas),) mean mP@k over the scored queries.
        prs: (nq, len(kappas)) mP@k per query; NaN rows for those left out.
        kappas: the k of mP@k.
    """

    map: float
    aps: np.ndarray
    mp: np.ndarray
    prs: np.ndarray
    kappas: tuple[int, ...]

    @property
    def scored(self) -> np.ndarray:
        """(nq,) bool: the queries with at least one positive."""
        return ~np.isnan(self.aps)


def revisited_map(
    positives: Sequence[np.ndarray],
    junk: Sequence[np.ndarray],
    num_positives: Sequence[int],
    kappas: Sequence[int] = KAPPAS,
) -> RevisitedScores:
    """mAP and mean mP@k of one setup over queries, from positions in their full rankings.

    Args:
        positives: per query, sorted 0-based positions of its positives in its ranking.
        junk: per query, sorted 0-based positions of its junk items.
        num_positives: per query, the positives its ground truth lists; 0 leaves it out.
        kappas: the k of mP@k.

    Raises:
        ValueError: lists of different lengths, or a k < 1.
    """
    nq = len(positives)
    if len(junk) != nq or len(num_positives) != nq:
        raise ValueError(
            f"positives, junk and num_positives must have one entry per query: "
            f"{nq}, {len(junk)}, {len(num_positives)}"
        )
    ks = tuple(int(k) for k in kappas)
    if any(k < 1 for k in ks):
        raise ValueError(f"kappas must be >= 1, got {ks}")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(ks)), np.nan)
    for q in range(nq):
        if num_positives[q] > 0:
            aps[q], prs[q] = revisited_query(positives[q], junk[q], int(num_positives[q]), ks)
    scored = ~np.isnan(aps)
    if not scored.any():
        return RevisitedScores(float("nan"), aps, np.full(len(ks), np.nan), prs, ks)
    return RevisitedScores(float(aps[scored].mean()), aps, prs[scored].mean(axis=0), prs, ks)


def revisited_rankings(
    rankings: np.ndarray,
    easy: Sequence[Sequence[int] | np.ndarray],
    hard: Sequence[Sequence[int] | np.ndarray],
    junk: Sequence[Sequence[int] | np.ndarray],
    kappas: Sequence[int] = KAPPAS,
) -> dict[str, RevisitedScores]:
    """The three setups scored from full rankings.

    Args:
        rankings: (nq, n) gallery ids, row q query q's ranking best first (every gallery item
            once, for scores comparable with papers).
        easy, hard, junk: per query, the gallery ids of its ground truth.
        kappas: the k of mP@k.

    Returns:
        setup name -> :class:`RevisitedScores`, in the order of :data:`SETUPS`.
    """
    ranked = np.asarray(rankings)
    if ranked.ndim != 2 or not len(easy) == len(hard) == len(junk) == ranked.shape[0]:
        raise ValueError(
            f"rankings must be (nq, n) with one easy, hard and junk list per row; got "
            f"{ranked.shape}, {len(easy)}, {len(hard)}, {len(junk)}"
        )
    scores = {}
    for setup in SETUPS:
        pos, bad, counts = [], [], []
        for q in range(ranked.shape[0]):
            ok, out = setup_lists(easy[q], hard[q], junk[q], setup)
            pos.append(positions_in_ranking(ranked[q], ok))
            bad.append(positions_in_ranking(ranked[q], out))
            counts.append(ok.size)
        scores[setup] = revisited_map(pos, bad, counts, kappas)
    return scores

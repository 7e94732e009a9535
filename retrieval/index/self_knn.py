"""Exact leave-one-out k-nearest neighbours of a set of vectors, at half the cost of a search.

Every row of ``x`` queries all the other rows by inner product. The score matrix ``x x^T``
is symmetric, so :func:`exact_self_knn` computes only its blocks ``(i, j)`` with ``j >= i``
and uses each one twice: its rows update the top-k of row block ``i``, its columns (the rows
of the transposed block) the top-k of row block ``j``. That is half the flops of a FAISS
``IndexFlatIP`` search of all rows.

A row's running top-k only changes through block entries above its current k-th score,
and after the first block few are: one pass over each block screens the maxima of groups
of rows against their thresholds, and the few entries that pass are sorted and merged into
the running top-k. Each row block is first filled from block 0 by a dense top-k; blocks
then reach every row in ascending id order, which makes ties come out by ascending id.
Memory beyond ``x`` and the ``(n, k)`` results is one ``block_size x block_size`` float32
score block and a few arrays of candidates.

:func:`drop_self` is the other way to leave a query out: search ``k + 1`` neighbours with
any index and drop the query's own id (approximate indexes, GPU, subsets of queries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from retrieval.infra.checks import positive_int

if TYPE_CHECKING:
    import torch

__all__ = ["drop_self", "exact_self_knn", "self_join_pays_off"]

#: Most rows per block by default; 4096 x 4096 float32 scores take 64 MiB.
MAX_BLOCK_SIZE = 4096
_GROUP = 8  # rows screened together against their lowest threshold
#: The join beats a FAISS search of every row when ``k * _JOIN_COST <= n * dim``
#: (experiments/2026-12-07_cost_models_cpu.md).
_JOIN_COST = 500_000


def drop_self(
    scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from ``k + 1`` search results.

    Per row, the column whose id equals the query's own id is removed; if the id is not
    among them (ties with exact duplicates, or an approximate index, can push it out), the
    last column is removed instead. Duplicates of a query therefore remain as results.

    Args:
        scores: (nq, c) search scores, best first, ``c >= 1``.
        ids: (nq, c) int64 ids found.
        self_ids: (nq,) the queries' own ids.

    Returns:
        ``(scores, ids)``, each (nq, c - 1), in the same order, never the query's own id.
    """
    nq, cols = ids.shape
    is_self = ids == np.asarray(self_ids, dtype=np.int64)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), cols - 1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(nq), drop] = False
    return scores[keep].reshape(nq, cols - 1), ids[keep].reshape(nq, cols - 1)


def self_join_pays_off(n: int, dim: int, k: int) -> bool:
    """Whether :func:`exact_self_knn` of ``n`` rows of ``dim`` floats is expected to beat an
    exact FAISS search of every row for ``k + 1`` neighbours.

    The join halves the flops but handles each candidate that enters a running top-k in
    numpy (about ``k * (1 + ln(n / block))`` per row) and takes its first top-k densely, so
    it pays off for large ``n * dim`` and small ``k``: ``k * 500_000 <= n * dim``.
    """
    return int(k) * _JOIN_COST <= int(n) * int(dim)


def exact_self_knn(
    x: np.ndarray, k: int, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest inner-product other rows of every row of ``x``, exactly.

    A row is excluded from its own results by index, never by score: an exact duplicate of
    a row is an ordinary result (usually its first). Ties in score are ordered by ascending
    id, as a stable sort of ``-score`` would (``-0.0`` and ``0.0`` count as equal).

    Args:
        x: (n, d) real array, converted to C-contiguous float32 (a copy only if needed).
            Products must stay finite.
        k: neighbours per row, ``>= 1``; clamped to ``n - 1``.
        block_size: rows per block, ``>= 1``; ``None`` takes ``n / 8`` within
            ``[1024, 4096]`` (smaller blocks waste less on the diagonal blocks, computed
            whole; larger ones cost less per block). Speed only: results do not depend on it.

    Returns:
        ``(D, I)``: D (n, k') float32 scores, non-increasing along each row; I (n, k') int64
        ids, where ``k' = min(k, n - 1)`` (0 columns for ``n <= 1``).

    Raises:
        ValueError: ``x`` not 2-D or not finite, ``k < 1`` or ``block_size < 1``, or
            inner products that overflow float32.
    """
    import torch

    positive_int(k, "k")
    if block_size is not None:
        positive_int(block_size, "block_size")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D (n, d) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values (after conversion to float32)")
    n = x.shape[0]
    if block_size is None:
        block_size = min(MAX_BLOCK_SIZE, max(1024, -(-n // 8)))
    top = _TopK(n, max(0, min(int(k), n - 1)))
    if top.k > 0:
        _join(torch.from_numpy(x), int(block_size), top)
    if (top.ids < 0).any():  # only -inf or NaN scores are never taken
        raise ValueError("inner products of x overflow float32: scale the rows down")
    return top.scores, top.ids


def _join(xt: torch.Tensor, block_size: int, top: _TopK) -> None:
    """Feed every block pair ``(i, j >= i)`` of ``x x^T`` to ``top``, ids ascending per row."""
    n = xt.shape[0]
    starts = list(range(0, n, block_size)) + [n]
    blocks = list(zip(starts[:-1], starts[1:], strict=True))
    rows = -(-min(block_size, n) // _GROUP) * _GROUP
    buf = np.empty(rows * min(block_size, n), dtype=np.float32)
    # every row block first sees block 0 (its top-k so far: block 0's best, densely) ...
    for i, (a0, a1) in enumerate(blocks):
        s = _scores(xt, (a0, a1), blocks[0], buf)
        if i == 0:
            np.fill_diagonal(s, -np.inf)
        else:
            top.sparse(s, (a0, a1), 0, rows=False, cols=True)  # block 0 learns of block i
        top.first(s, (a0, a1))
    # ... then blocks 1, 2, ... in turn, through its rows or columns
    for i, (a0, a1) in enumerate(blocks[1:], start=1):
        for j in range(i, len(blocks)):
            s = _scores(xt, (a0, a1), blocks[j], buf)
            if j == i:
                np.fill_diagonal(s, -np.inf)
            top.sparse(s, (a0, a1), blocks[j][0], rows=True, cols=j > i)


def _scores(
    xt: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], buf: np.ndarray
) -> np.ndarray:
    """``x[rows] @ x[cols].T`` in ``buf``, padded with rows of -inf to whole groups.

    ``torch.mm``, not numpy's matmul: OpenBLAS can round the products of one row with two
    identical rows differently by where they fall in a block, which would break the ties of
    exact duplicates (ascending id)."""
    import torch

    nr, nc = rows[1] - rows[0], cols[1] - cols[0]
    out = buf[: -(-nr // _GROUP) * _GROUP * nc].reshape(-1, nc)
    torch.mm(xt[rows[0] : rows[1]], xt[cols[0] : cols[1]].T, out=torch.from_numpy(out[:nr]))
    out[nr:] = -np.inf
    return out


def _screen(s3: np.ndarray, thr_r: np.ndarray, thr_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups and columns of ``s3`` (groups, _GROUP, nc) whose maximum over the group's rows
    exceeds the lowest threshold of those rows or the column's threshold."""
    import torch

    groups, _, nc = s3.shape
    peak = torch.amax(torch.from_numpy(s3), dim=1).numpy()  # one parallel pass over s3
    low = thr_r.reshape(groups, _GROUP).min(axis=1)
    flat = np.flatnonzero(peak > min(low.min(), thr_c.min()))  # few pass the lowest ...
    grp, col = np.divmod(flat, nc)
    keep = peak.ravel()[flat] > np.minimum(low[grp], thr_c[col])  # ... then their own
    return grp[keep], col[keep]


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """uint32 keys that sort ascending as ``scores`` descend (``-0.0`` equal to ``0.0``)."""
    bits = (scores + np.float32(0.0)).view(np.uint32)
    negative = bits >> np.uint32(31) == 1
    ascending = np.where(negative, ~bits, bits | np.uint32(1 << 31))
    return ~ascending


class _TopK:
    """Running top-k of every row: scores descending, ties by ascending id; -inf / -1 pad."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)

    def first(self, s: np.ndarray, block: tuple[int, int]) -> None:
        """Set the top-k of rows ``block`` to the best of ``s``, their scores with block 0."""
        import torch

        row0 = block[0]
        s = s[: block[1] - row0]  # without the padding
        k = min(self.k, s.shape[1])
        if s.shape[1] > k:
            vals, cols = (a.numpy() for a in torch.topk(torch.from_numpy(s), k + 1, dim=1))
            ranked = cols[:, :k].copy()
            for r in np.flatnonzero(vals[:, k - 1] == vals[:, k]):
                # the k-th score ties: topk may not pick the lowest ids
                ranked[r] = np.argsort(-s[r], kind="stable")[:k]
        else:
            ranked = np.broadcast_to(np.arange(k), (s.shape[0], k))
        ranked = np.sort(ranked, axis=1)  # ascending ids, then a stable sort by score
        vals = np.take_along_axis(s, ranked, axis=1) + np.float32(0.0)
        order = np.argsort(_descending_key(vals), axis=1, kind="stable")
        rows = slice(row0, row0 + s.shape[0])
        self.scores[rows, :k] = np.take_along_axis(vals, order, axis=1)
        ids = np.take_along_axis(ranked, order, axis=1)
        self.ids[rows, :k] = np.where(self.scores[rows, :k] == -np.inf, -1, ids)

    def sparse(
        self, s: np.ndarray, block: tuple[int, int], col0: int, rows: bool, cols: bool
    ) -> None:
        """Merge ``s``, the scores of rows ``block`` (padded to whole groups) with ids
        ``col0 + c``, into the top-k of those rows if ``rows``, and its transpose into the
        top-k of rows ``col0 + c`` if ``cols``.

        Each block's ids must be above the ids already merged into the rows it updates.
        Only entries above a row's current k-th score can enter its top-k (an equal score
        has a higher id): :func:`_screen` finds the groups of rows holding them.
        """
        (row0, row1), nc = block, s.shape[1]
        thr_r = np.full(s.shape[0], np.inf, dtype=np.float32)
        if rows:
            thr_r[: row1 - row0] = self.scores[row0:row1, -1]
        thr_c = self.scores[col0 : col0 + nc, -1] if cols else np.full(nc, np.inf, np.float32)
        s3 = s.reshape(-1, _GROUP, nc)
        grp, col = _screen(s3, thr_r, thr_c)
        vals = s3[grp, :, col]  # (hits, _GROUP): every row of each group that passed
        row = grp[:, None] * _GROUP + np.arange(_GROUP)
        col = np.broadcast_to(col[:, None], row.shape)
        # boolean indexing keeps the row-major order: ids ascend within every target row
        if rows:
            hit = vals > thr_r[row]
            self._merge(row[hit] + row0, col[hit] + col0, vals[hit])
        if cols:
            hit = vals > thr_c[col]
            self._merge(col[hit] + col0, row[hit] + row0, vals[hit])

    def _merge(self, rows: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> None:
        """Merge candidates (ascending ids within each row, above the rows' current ids)
        into the top-k: one sort of the candidates, then a linear merge with the running
        lists, in which a running entry goes first on equal scores (its id is lower)."""
        if rows.size == 0:
            return
        k, vals = self.k, vals + np.float32(0.0)
        key = (rows.astype(np.int64) << 32) | _descending_key(vals).astype(np.int64)
        order = np.argsort(key, kind="stable")
        key, rows, ids, vals = key[order], rows[order], ids[order], vals[order]
        first = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
        touched = rows[first]
        run_vals, run_ids = self.scores[touched], self.ids[touched]  # (t, k) each
        run_key = (touched.astype(np.int64)[:, None] << 32) | _descending_key(run_vals)
        # rank of every entry within its row's merged list
        before = np.searchsorted(run_key.ravel(), key, side="right")  # running entries first
        row_of = np.repeat(np.arange(touched.size), np.diff(np.append(first, rows.size)))
        cand_rank = before - row_of * k + np.arange(rows.size) - first[row_of]
        passed = np.cumsum(np.bincount(before, minlength=run_key.size + 1))[:-1]
        run_rank = np.arange(k) + (passed.reshape(-1, k) - first[:, None])
        new_vals, new_ids = np.empty_like(run_vals), np.empty_like(run_ids)
        keep = run_rank < k
        slot = np.nonzero(keep)[0], run_rank[keep]
        new_vals[slot], new_ids[slot] = run_vals[keep], run_ids[keep]
        keep = cand_rank < k
        slot = row_of[keep], cand_rank[keep]
        new_vals[slot], new_ids[slot] = vals[keep], ids[keep]
        self.scores[touched], self.ids[touched] = new_vals, new_ids

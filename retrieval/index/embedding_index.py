"""EmbeddingIndex: an inner-product FAISS index over L2-normalised float32 embeddings.

Beside it, :func:`knn_recall`: how good an approximate index's neighbours are against
exact search's.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.index import structure
from retrieval.index.faiss_runtime import check_temp_memory, import_faiss, place, to_cpu
from retrieval.index.self_knn import drop_self, exact_self_knn
from retrieval.infra.checks import checked_vectors, positive_int
from retrieval.infra.io import fsync_dir, sha256_file
from retrieval.infra.ties import by_score_then_id

__all__ = ["EmbeddingIndex", "knn_recall", "search_ties_resolved"]


log = logging.getLogger(__name__)


class EmbeddingIndex:
    """Nearest-neighbour index over L2-normalised float32 vectors, scored by inner product.

    The index is fully described by its dimension, a FAISS factory string (``"Flat"``,
    ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF256,PQ16"``, ...) and the inner-product metric, so
    that on unit vectors scores are cosine similarities (higher = more similar). Vectors are
    expected to be L2-normalised already; the index does not normalise them. Ids are row
    numbers: the i-th vector added has id i, and ``remove_ids`` renumbers like deleting rows.

    Args:
        dim: embedding dimension, >= 1.
        factory: FAISS ``index_factory`` string. ``"Flat"`` is exact search.
        use_gpu: ``None`` puts the index on GPU 0 when faiss has GPU support, sees a GPU and
            can convert this index type (HNSW, for one, stays on the CPU). ``True`` requires
            all that and raises otherwise; ``False`` always stays on the CPU.
        search_params: optional FAISS ``ParameterSpace`` string applied at construction, e.g.
            ``"nprobe=16"`` for IVF indexes or ``"efSearch=64"`` for HNSW; ``""`` keeps the
            FAISS defaults (``nprobe=1``, ``efSearch=16``).
        gpu_temp_memory: bytes of scratch memory FAISS may reserve on the GPU
            (``StandardGpuResources.setTempMemory``); ``None`` keeps the FAISS default.
            Ignored on the CPU.

    With more than one GPU (and ``use_gpu`` not False) the index is sharded over all of
    them instead of GPU 0 (Flat, IVF-Flat, IVF-SQ, IVF-PQ). Such an index is for searching:
    ``train`` / ``add`` / ``remove_ids`` copy it to the CPU and back (O(ntotal) each), so
    build it with ``use_gpu=False`` (e.g. trained on :func:`retrieval.index.shards.training_sample`
    and filled from :func:`~retrieval.index.shards.iter_chunks`), save it and load it onto the
    GPUs. ``save`` writes the CPU form with a sha256 checksum and ``load`` checks it.

    Raises:
        ImportError: faiss is not installed.
        ValueError: bad ``dim`` or ``gpu_temp_memory``, unknown factory string, unknown
            search parameter, or ``use_gpu=True`` with an index type faiss cannot put on a GPU.
        RuntimeError: ``use_gpu=True`` but faiss has no usable GPU.
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        use_gpu: bool | None = None,
        search_params: str = "",
        gpu_temp_memory: int | None = None,
    ) -> None:
        faiss = import_faiss()
        dim = positive_int(dim, "dim")
        temp_memory = check_temp_memory(gpu_temp_memory)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {err}") from err
        structure.apply_search_params(faiss, index, search_params, factory)
        self._setup(faiss, index, factory, search_params, use_gpu, temp_memory)

    _index: Any
    _gpu_resources: Any

    def _setup(
        self,
        faiss: Any,
        cpu_index: Any,
        factory: str,
        search_params: str,
        use_gpu: bool | None,
        temp_memory: int | None,
    ) -> None:
        """Hold ``cpu_index`` (built or read from disk), on GPU 0 if asked and possible."""
        self._dim = int(cpu_index.d)
        self._factory = factory
        self._search_params = search_params
        self._use_gpu = use_gpu
        self._temp_memory = temp_memory
        self._bytes_per_vector = structure.bytes_per_vector(faiss, cpu_index)
        self._min_train_rows = structure.min_train_rows(faiss, cpu_index)  # GPU forms hide it
        self._place(faiss, cpu_index)

    def _place(self, faiss: Any, cpu_index: Any) -> None:
        """Put ``cpu_index`` where ``use_gpu`` asks: sharded over all GPUs when there are
        several, else per :func:`~retrieval.index.faiss_runtime.to_gpu`."""
        args = (faiss, cpu_index, self._use_gpu, self._temp_memory, self._factory)
        self._index, self._gpu_resources = place(*args)

    @property
    def _sharded(self) -> bool:
        """Whether the index is split over several GPUs (``to_all_gpus``)."""
        return isinstance(self._gpu_resources, list)

    def _through_cpu(self, change: Callable[[Any], None]) -> None:
        """Apply ``change`` to the CPU form of the index, then place it again."""
        faiss = import_faiss()
        cpu_index = to_cpu(faiss, self._index, self.on_gpu)
        change(cpu_index)
        if self.on_gpu:
            self._place(faiss, cpu_index)

    @property
    def on_gpu(self) -> bool:
        """Whether the index lives on a GPU."""
        return self._gpu_resources is not None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        dim: int | None = None,
        factory: str | None = None,
        use_gpu: bool | None = None,
        search_params: str = "",
        sha256: str | None = None,
        gpu_temp_memory: int | None = None,
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: the index file.
            dim: expected dimension; ``None`` accepts the file's.
            factory: the factory string to report as :attr:`factory` (faiss files do not
                store it); ``None`` derives one from the index (e.g. ``"IVF64,PQ8x8"``).
            use_gpu, gpu_temp_memory: as for the constructor.
            search_params: applied after reading. faiss files keep ``nprobe`` / ``efSearch``
                as they were when saved, and ``""`` keeps those.
            sha256: the hex digest :meth:`save` returned; when given, the file is checked
                against it before faiss parses it.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: checksum mismatch; a truncated, corrupt or non-faiss file; an index
                whose metric is not inner product or whose dimension is not ``dim``; bad
                ``search_params``; and the constructor's GPU errors. Messages name the file.
        """
        faiss = import_faiss()
        expected_dim = None if dim is None else positive_int(dim, "dim")
        temp_memory = check_temp_memory(gpu_temp_memory)
        index = read_checked(faiss, path, sha256, expected_dim)
        what = factory if factory is not None else structure.describe(faiss, index)
        structure.apply_search_params(faiss, index, search_params, what)
        loaded = cls.__new__(cls)
        loaded._setup(faiss, index, what, search_params, use_gpu, temp_memory)
        return loaded

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the CPU form of the index to ``path`` atomically; return its sha256 hex.

        The file is written to a temporary file in the same folder, fsynced and renamed over
        ``path``, so a failure leaves any previous file at ``path`` intact and no temporary
        file behind. A GPU index is copied to the CPU for writing (memory for one more copy).

        Raises:
            FileNotFoundError: the folder of ``path`` does not exist.
            OSError, RuntimeError: writing failed (nothing at ``path`` changed).
        """
        faiss = import_faiss()
        return write_atomically(faiss, to_cpu(faiss, self._index, self.on_gpu), path)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def factory(self) -> str:
        """FAISS factory string the index was built from (or the description of a loaded one)."""
        return self._factory

    def structure_mismatch(self, factory: str) -> str | None:
        """Why this index is not one that the FAISS factory string ``factory`` builds, as a
        phrase (``"is a 'Flat' index, not a 'IVF1,Flat' one"``), None when it is: the index
        types and sizes are compared, not the strings (``HNSW32`` is ``HNSW32,Flat``). A GPU
        index is compared through a CPU copy."""
        faiss = import_faiss()
        cpu_index = to_cpu(faiss, self._index, self.on_gpu)
        return structure.structure_mismatch(faiss, cpu_index, factory)

    @property
    def search_params(self) -> str:
        """FAISS ParameterSpace string applied at construction (``""`` for defaults)."""
        return self._search_params

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index can accept vectors (always true for ``"Flat"`` and ``"HNSW*"``)."""
        return bool(self._index.is_trained)

    @property
    def exact_on_cpu(self) -> bool:
        """Whether this is an exact (``"Flat"``) index on the CPU, where :meth:`search_self`
        computes all neighbours with half the flops of a :meth:`search` of every vector."""
        faiss = import_faiss()
        return not self.on_gpu and isinstance(faiss.downcast_index(self._index), faiss.IndexFlat)

    @property
    def bytes_per_vector(self) -> float:
        """Bytes one stored vector costs: e.g. ``4 * dim`` for Flat, ``m + 8`` for IVF-PQm.

        Code, id and (for HNSW, on average) graph links; fixed costs such as IVF centroids
        and PQ codebooks are left out. See ``retrieval.index.structure.bytes_per_vector``.
        """
        return self._bytes_per_vector

    def train(self, xb: np.ndarray, max_train: int = 100_000, seed: int = 0) -> None:
        """Train the index (IVF centroids, PQ codebooks); a no-op if it is already trained.

        Args:
            xb: (n, dim) real array, converted to C-contiguous float32.
            max_train: at most this many rows are used, drawn uniformly without replacement
                with ``numpy.random.default_rng(seed)`` when ``n > max_train``.
            seed: seed of that sample, so training is deterministic.

        Raises:
            ValueError: bad shape or non-finite values; ``max_train < 1``; fewer rows than
                the index needs (e.g. fewer than ``nlist`` rows for ``"IVF{nlist},..."``).
        """
        if self.is_trained:
            return
        x = checked_vectors(xb, "xb", dim=self._dim)
        x = x[sample_positions(x.shape[0], positive_int(max_train, "max_train"), seed)]
        if x.shape[0] < self._min_train_rows:
            raise ValueError(
                f"index {self._factory!r} needs at least {self._min_train_rows} training vectors, "
                f"got {x.shape[0]}"
            )
        faiss = import_faiss()

        def train(index: Any) -> None:
            note = structure.few_training_rows(faiss, index, x.shape[0], self._factory)
            if note is not None:  # said once, instead of faiss's line per k-means run
                log.warning(note)
            index.train(x)

        try:
            if self._sharded:  # one quantizer for all shards, not one per GPU
                self._through_cpu(train)
            else:
                train(self._index)
        except RuntimeError as err:
            raise ValueError(f"training index {self._factory!r} failed: {err}") from err

    def add(self, xb: np.ndarray) -> None:
        """Add vectors; ids are assigned consecutively from ``ntotal``.

        Args:
            xb: (n, dim) real array (L2-normalised expected), converted to C-contiguous
                float32. ``n == 0`` is a no-op. An untrained index is first trained on ``xb``
                with the defaults of ``train``.

        Raises:
            ValueError: bad shape, non-finite values, or too few rows to train.
        """
        x = checked_vectors(xb, "xb", dim=self._dim)
        if x.shape[0] == 0:
            return
        if not self.is_trained:
            self.train(x)
        if self._sharded:  # IndexShards of GPU Flat indexes take one add only
            self._through_cpu(lambda index: index.add(x))
        else:
            self._index.add(x)

    def remove_ids(self, ids: np.ndarray) -> int:
        """Remove vectors by id; the rest are renumbered as if rows were deleted from a list.

        After removing ids ``R``, a vector that had id ``i`` has id ``i - |{r in R: r < i}|``,
        so ids stay ``0 .. ntotal - 1`` and the next ``add`` continues from ``ntotal``.
        Works for flat-code (Flat, PQ, SQ) and IVF indexes. Needs exclusive access: no
        search may run meanwhile. A GPU index is copied to the CPU and back.

        Args:
            ids: (n,) integer ids in ``[0, ntotal)``; duplicates count once; may be empty.

        Returns:
            The number of vectors removed.

        Raises:
            ValueError: bad ids; an HNSW index ("HNSW indexes cannot remove vectors; rebuild")
                or another type that cannot remove vectors.
        """
        to_remove = as_ids(ids, self.ntotal)
        if to_remove.size == 0:
            return 0
        faiss = import_faiss()
        self._through_cpu(
            lambda index: structure.remove_ids(faiss, index, to_remove, self._factory)
        )
        return int(to_remove.size)

    def search(
        self, xq: np.ndarray, k: int, chunk_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``k`` most similar indexed vectors of each query, best first.

        Queries are searched ``chunk_size`` at a time, so FAISS's working memory beyond the
        returned arrays is O(chunk_size * k).

        Args:
            xq: (nq, dim) real array, converted to C-contiguous float32; ``nq`` may be 0.
            k: number of neighbours, >= 1. A ``k`` larger than ``ntotal`` is clamped to
                ``ntotal``, so the outputs then have ``ntotal`` columns.
            chunk_size: queries per FAISS call, >= 1.

        Returns:
            ``(D, I)``: D (nq, k') float32 inner-product scores, non-increasing along each
            row; I (nq, k') int64 ids in ``[0, ntotal)``, where ``k' = min(k, ntotal)``.
            Approximate indexes (IVF, HNSW) may find fewer than k' neighbours; the missing
            slots hold id -1 and a score of about -3.4e38. Equal scores are ordered by
            ascending id, as everywhere in the project, also across the k-th place: of a
            group of equal scores cut there, the smaller ids are kept (FAISS itself lists
            equal scores by descending id and keeps an arbitrary part of a cut group; one
            more result is searched to see the cut, more only where a group straddles it).

        Raises:
            ValueError: empty index, ``k < 1``, ``chunk_size < 1``, bad shape or non-finite
                values.
        """
        if self.ntotal == 0:
            raise ValueError("cannot search an empty index: add vectors first")
        k_eff = min(positive_int(k, "k"), self.ntotal)
        positive_int(chunk_size, "chunk_size")
        x = checked_vectors(xq, "xq", dim=self._dim)
        nq = x.shape[0]
        scores = np.empty((nq, k_eff), dtype=np.float32)
        ids = np.empty((nq, k_eff), dtype=np.int64)
        for start in range(0, nq, chunk_size):
            stop = min(start + chunk_size, nq)
            found = search_ties_resolved(self._index, x[start:stop], k_eff)
            scores[start:stop], ids[start:stop] = found
        return scores, ids

    def search_self(self, k: int, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out search: the ``k`` most similar other indexed vectors of each one.

        Row ``i`` holds the neighbours of the vector with id ``i`` among all the others; its
        own id is removed by index, never by score, so exact duplicates remain as results.
        When :attr:`exact_on_cpu`, the stored vectors are copied out once and joined with
        themselves by :func:`~retrieval.index.self_knn.exact_self_knn` (symmetric blocks:
        half the flops; ties by ascending id). Any other index is searched with its stored
        vectors, read back ``chunk_size`` at a time, for ``k + 1`` neighbours, and the own
        id dropped by :func:`~retrieval.index.self_knn.drop_self`; lossy codes (PQ, SQ)
        are searched with their decoded vectors, and a GPU index is first copied to the
        CPU to read them.

        Args:
            k: neighbours per vector, >= 1; clamped to ``ntotal - 1``.
            chunk_size: vectors per FAISS call when not exact on the CPU, >= 1.

        Returns:
            ``(D, I)``, each (ntotal, min(k, ntotal - 1)): scores, non-increasing along each
            row, and int64 ids, as for :meth:`search`.

        Raises:
            ValueError: empty index, ``k < 1``, ``chunk_size < 1``, or an index type that
                cannot read back its vectors (faiss ``reconstruct_n``).
        """
        if self.ntotal == 0:
            raise ValueError("cannot search an empty index: add vectors first")
        positive_int(k, "k")
        positive_int(chunk_size, "chunk_size")
        n = self.ntotal
        if self.exact_on_cpu:
            return exact_self_knn(self._index.reconstruct_n(0, n), k)
        cpu_index = to_cpu(import_faiss(), self._index, self.on_gpu)
        cols = min(k, n - 1)
        scores = np.empty((n, cols), dtype=np.float32)
        ids = np.empty((n, cols), dtype=np.int64)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            try:
                xq = cpu_index.reconstruct_n(start, stop - start)
            except RuntimeError as err:
                raise ValueError(
                    f"a {self._factory!r} index cannot read back its vectors: {err}"
                ) from err
            found = self.search(xq, k + 1, chunk_size)
            scores[start:stop], ids[start:stop] = drop_self(*found, np.arange(start, stop))
        return scores, ids


def search_ties_resolved(index: Any, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` results per row of ``x`` in the faiss ``index``, with equal scores by ascending
    id, also when a group of equal scores straddles the k-th place: FAISS then keeps an
    arbitrary part of the group, so one more result is searched, and rows whose k-th score
    still equals their last one are searched again with twice as many until the group ends
    inside (or ``ntotal``)."""
    n = int(index.ntotal)
    want = min(n, k + 1)
    scores, ids = by_score_then_id(*index.search(x, want))
    open_rows = np.flatnonzero((scores[:, k - 1] == scores[:, -1]) & (ids[:, -1] >= 0))
    while want < n and open_rows.size:
        want = min(n, 2 * want)
        more_scores, more_ids = by_score_then_id(*index.search(x[open_rows], want))
        scores[open_rows], ids[open_rows] = (
            more_scores[:, : scores.shape[1]],
            more_ids[:, : scores.shape[1]],
        )
        still = (more_scores[:, k - 1] == more_scores[:, -1]) & (more_ids[:, -1] >= 0)
        open_rows = open_rows[still]
    return scores[:, :k], ids[:, :k]


def _hash_and_sync(path: Path) -> str:
    """sha256 hex of the file at ``path``, after flushing it to disk with fsync."""
    with open(path, "r+b") as f:
        os.fsync(f.fileno())
    return sha256_file(path)


def write_atomically(faiss: Any, cpu_index: Any, path: str | os.PathLike[str]) -> str:
    """Write ``cpu_index`` to ``path`` all-or-nothing; return the file's sha256 hex.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        OSError / RuntimeError: writing failed; any previous file at ``path`` is unchanged
            and no temporary file is left behind.
    """
    dest = Path(path)
    folder = dest.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save index to {dest}: folder {folder} does not exist")
    tmp = folder / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    try:
        faiss.write_index(cpu_index, str(tmp))
        sha256 = _hash_and_sync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return sha256


def check_sha256(sha256: str) -> str:
    """Validate a sha256 hex digest (64 hex digits, any case); return it lower-case."""
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    try:
        int(sha256, 16)
    except ValueError:
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}") from None
    return sha256.lower()


def read_checked(
    faiss: Any, path: str | os.PathLike[str], sha256: str | None, dim: int | None
) -> Any:
    """Read the faiss index at ``path``: sha256 first (when given), then metric and ``dim``.

    The file is hashed, then parsed by faiss: whoever can replace the file between the two
    steps could defeat the check, so keep index files in folders only you write to.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: checksum mismatch, or a file faiss cannot read (truncated, corrupt or
            not a faiss index); an index whose metric is not inner product or whose
            dimension is not ``dim`` (when given). Messages name the file.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no index file at {src}")
    if sha256 is not None:
        expected = check_sha256(sha256)
        actual = sha256_file(src)
        if actual != expected:
            raise ValueError(
                f"index file {src} has sha256 {actual}, expected {expected}: the file was "
                "changed or damaged since it was written; re-export it"
            )
    try:
        index = faiss.read_index(str(src))
    except (RuntimeError, MemoryError) as err:
        raise ValueError(
            f"cannot read the index file {src}: it is truncated, corrupt or not a faiss index "
            f"({err})"
        ) from err
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        metric = "L2" if index.metric_type == faiss.METRIC_L2 else str(index.metric_type)
        raise ValueError(
            f"index at {src} uses metric {metric}, expected inner product: "
            "EmbeddingIndex searches L2-normalised embeddings by inner product"
        )
    if dim is not None and index.d != dim:
        raise ValueError(f"index at {src} has dim {index.d}, expected {dim}")
    return index


def as_ids(ids: Any, ntotal: int) -> np.ndarray:
    """Validate ``ids`` as a 1-D integer array of ids in ``[0, ntotal)``.

    Returns:
        The distinct ids, sorted, as C-contiguous int64 (duplicates count once).
    """
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= ntotal:
        raise ValueError(
            f"ids must lie in [0, {ntotal}) (the index holds {ntotal} vectors), "
            f"got ids from {arr.min()} to {arr.max()}"
        )
    return np.ascontiguousarray(np.unique(arr), dtype=np.int64)


def sample_positions(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a training sample of ``n`` rows: all of ``0 .. n-1`` when
    ``n <= max_rows``, else ``max_rows`` of them drawn without replacement by
    ``numpy.random.default_rng(seed)``. Every training sample in the package is drawn so.

    >>> sample_positions(3, 5).tolist()
    [0, 1, 2]
    """
    positive_int(max_rows, "max_rows")
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


_CHUNK_ELEMENTS = 1 << 22  # bound on the (rows, k_found, k) comparison block


def knn_recall(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Recall@k of an index against exact search: mean over queries of |found ∩ exact| / k.

    ``k`` is ``exact_ids.shape[1]``. Ids are compared as sets per query, so order within a
    row does not matter and a duplicate in ``found_ids`` counts once. Negative ids (faiss's
    -1 for "no result") never match, in either array.

    Args:
        found_ids: (nq, k_found) integer ids returned by the index under test.
        exact_ids: (nq, k) integer ids of the exact top k (e.g. a ``"Flat"`` index); the
            non-negative ids of a row must be distinct.

    Returns:
        Recall in ``[0, 1]``.

    Raises:
        ValueError: non-2-D or non-integer arrays, different numbers of rows, ``nq == 0``,
            ``k == 0``, or a repeated id in a row of ``exact_ids``.
    """
    found, exact = np.asarray(found_ids), np.asarray(exact_ids)
    for name, arr in (("found_ids", found), ("exact_ids", exact)):
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D (nq, k), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    nq, k = exact.shape
    if found.shape[0] != nq:
        raise ValueError(f"found_ids has {found.shape[0]} rows but exact_ids has {nq}")
    if nq == 0 or k == 0:
        raise ValueError(f"knn_recall needs at least one query and k >= 1, got shape {exact.shape}")
    ordered = np.sort(exact, axis=1)
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
        raise ValueError("exact_ids repeats an id within a row; pass the exact top-k ids")
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, k * found.shape[1]))
    hits = 0
    for start in range(0, nq, rows_per_chunk):
        f = found[start : start + rows_per_chunk, :, None]
        e = exact[start : start + rows_per_chunk, None, :]
        hits += int(((f == e) & (e >= 0)).any(axis=1).sum())
    return hits / (nq * k)

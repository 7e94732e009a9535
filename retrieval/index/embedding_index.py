"""EmbeddingIndex: an inner-product FAISS index over L2-normalised float32 embeddings."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from retrieval.index import _structure
from retrieval.index._checks import as_ids, sample_positions
from retrieval.index._faiss import check_temp_memory, import_faiss, to_cpu
from retrieval.index.placement import PlacedIndex
from retrieval.index.self_knn import drop_self, exact_self_knn
from retrieval.index.ties import search_ties_resolved
from retrieval.infra.checks import positive_int, vectors

__all__ = ["EmbeddingIndex"]

log = logging.getLogger(__name__)


class EmbeddingIndex(PlacedIndex):
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
    build it with ``use_gpu=False`` (e.g. trained on :func:`retrieval.index.build.training_sample`
    and filled from :func:`~retrieval.index.build.iter_chunks`), save it and load it onto the
    GPUs. Placement and ``save`` / ``load`` with checksums come from
    :class:`~retrieval.index.placement.PlacedIndex`.

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
        _structure.apply_search_params(faiss, index, search_params, factory)
        self._setup(faiss, index, factory, search_params, use_gpu, temp_memory)

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
        return _structure.structure_mismatch(faiss, cpu_index, factory)

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
        and PQ codebooks are left out. See ``retrieval.index._structure.bytes_per_vector``.
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
        x = vectors(xb, "xb", dim=self._dim)
        x = x[sample_positions(x.shape[0], positive_int(max_train, "max_train"), seed)]
        if x.shape[0] < self._min_train_rows:
            raise ValueError(
                f"index {self._factory!r} needs at least {self._min_train_rows} training vectors, "
                f"got {x.shape[0]}"
            )
        faiss = import_faiss()

        def train(index: Any) -> None:
            note = _structure.few_training_rows(faiss, index, x.shape[0], self._factory)
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
        x = vectors(xb, "xb", dim=self._dim)
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
            lambda index: _structure.remove_ids(faiss, index, to_remove, self._factory)
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
        x = vectors(xq, "xq", dim=self._dim)
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

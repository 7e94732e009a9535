"""The one wrapper of FAISS: an inner-product index over L2-normalised float32 embeddings.

This is the only module of the package that imports ``faiss``; it does so lazily, so the
rest of the package imports without it and a missing install fails with a clear ImportError.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["EmbeddingIndex"]


def _faiss() -> Any:
    """Return the ``faiss`` module, or raise an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "retrieval.index needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12 for GPU search)"
        ) from err
    return faiss


def _gpu_available(faiss: Any) -> bool:
    """True when the installed faiss build has GPU support and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return (
        get_num_gpus is not None and get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    )


def _as_vectors(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Validate ``x`` as an (n, dim) array of finite reals; return it as C-contiguous float32."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values (after conversion to float32)")
    return arr


class EmbeddingIndex:
    """Nearest-neighbour index over L2-normalised float32 vectors, scored by inner product.

    The index is fully described by its dimension, a FAISS factory string (``"Flat"``,
    ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF256,PQ16"``, ...) and the inner-product metric, so
    that on unit vectors scores are cosine similarities (higher = more similar). Vectors are
    expected to be L2-normalised already; the index does not normalise them.

    Args:
        dim: embedding dimension, >= 1.
        factory: FAISS ``index_factory`` string. ``"Flat"`` is exact search.
        use_gpu: ``None`` puts the index on GPU 0 when faiss has GPU support and sees a GPU
            (only ``"Flat"`` indexes; the others stay on the CPU). ``True`` requires that and
            raises otherwise; ``False`` always stays on the CPU.
        search_params: optional FAISS ``ParameterSpace`` string applied at construction, e.g.
            ``"nprobe=16"`` for IVF indexes or ``"efSearch=64"`` for HNSW; ``""`` keeps the
            FAISS defaults (``nprobe=1``, ``efSearch=16``).

    Raises:
        ImportError: faiss is not installed.
        ValueError: bad ``dim``, unknown factory string, unknown search parameter, or
            ``use_gpu=True`` with a factory other than ``"Flat"``.
        RuntimeError: ``use_gpu=True`` but faiss has no usable GPU.
    """

    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        use_gpu: bool | None = None,
        search_params: str = "",
    ) -> None:
        faiss = _faiss()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self._dim = int(dim)
        self._factory = factory
        self._search_params = search_params
        try:
            index = faiss.index_factory(self._dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {err}") from err
        if search_params:
            try:
                faiss.ParameterSpace().set_index_parameters(index, search_params)
            except RuntimeError as err:
                raise ValueError(
                    f"cannot apply search_params {search_params!r} to a {factory!r} index: {err}"
                ) from err
        if use_gpu is True:
            if factory != "Flat":
                raise ValueError(f"only 'Flat' indexes can go to the GPU, got {factory!r}")
            if not _gpu_available(faiss):
                raise RuntimeError("use_gpu=True but the installed faiss has no usable GPU")
        want_gpu = use_gpu is not False and factory == "Flat" and _gpu_available(faiss)
        self._gpu_resources: Any = None
        self._index: Any = None
        self._attach(index, on_gpu=want_gpu)

    def _attach(self, cpu_index: Any, on_gpu: bool) -> None:
        """Hold ``cpu_index`` (a CPU faiss index, e.g. one read from disk), on GPU 0 if asked."""
        if on_gpu:
            faiss = _faiss()
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)
        else:
            self._gpu_resources = None
            self._index = cpu_index

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def factory(self) -> str:
        """FAISS factory string the index was built from."""
        return self._factory

    @property
    def search_params(self) -> str:
        """FAISS ParameterSpace string applied at construction (``""`` for defaults)."""
        return self._search_params

    @property
    def ntotal(self) -> int:
        """Number of vectors added so far."""
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index can accept vectors (always true for ``"Flat"`` and ``"HNSW*"``)."""
        return bool(self._index.is_trained)

    @property
    def on_gpu(self) -> bool:
        """Whether the index lives on a GPU."""
        return self._gpu_resources is not None

    def _min_train_rows(self) -> int:
        """Fewest training rows FAISS accepts: the IVF list count and/or PQ codebook size."""
        faiss = _faiss()
        needed = 1
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None:
            needed = max(needed, int(ivf.nlist))
        for holder in (ivf, self._index):
            pq = getattr(holder, "pq", None)
            if pq is not None:
                needed = max(needed, int(pq.ksub))
        return needed

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
        if max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {max_train}")
        x = _as_vectors(xb, self._dim, "xb")
        if x.shape[0] > max_train:
            rows = np.random.default_rng(seed).choice(x.shape[0], size=max_train, replace=False)
            x = x[np.sort(rows)]
        needed = self._min_train_rows()
        if x.shape[0] < needed:
            raise ValueError(
                f"index {self._factory!r} needs at least {needed} training vectors, "
                f"got {x.shape[0]}"
            )
        try:
            self._index.train(x)
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
        x = _as_vectors(xb, self._dim, "xb")
        if x.shape[0] == 0:
            return
        if not self.is_trained:
            self.train(x)
        self._index.add(x)

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
            slots hold id -1 and a score of about -3.4e38. Ties in score are ordered as FAISS
            returns them.

        Raises:
            ValueError: empty index, ``k < 1``, ``chunk_size < 1``, bad shape or non-finite
                values.
        """
        if self.ntotal == 0:
            raise ValueError("cannot search an empty index: add vectors first")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        x = _as_vectors(xq, self._dim, "xq")
        k_eff = min(int(k), self.ntotal)
        nq = x.shape[0]
        scores = np.empty((nq, k_eff), dtype=np.float32)
        ids = np.empty((nq, k_eff), dtype=np.int64)
        for start in range(0, nq, chunk_size):
            stop = min(start + chunk_size, nq)
            scores[start:stop], ids[start:stop] = self._index.search(x[start:stop], k_eff)
        return scores, ids

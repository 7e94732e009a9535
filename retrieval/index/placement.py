"""Where an :class:`~retrieval.index.EmbeddingIndex` keeps its faiss index, and its files.

:class:`PlacedIndex` holds a faiss index on the CPU, on GPU 0 or sharded over all GPUs (as
``use_gpu`` asks, see :func:`retrieval.index._faiss.place`), applies changes to its CPU form,
and writes and reads it as an index file with a sha256 checksum (:mod:`retrieval.index._files`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from retrieval.index import _structure
from retrieval.index._faiss import check_temp_memory, import_faiss, place, to_cpu
from retrieval.index._files import read_checked, write_atomically
from retrieval.infra.checks import positive_int

__all__ = ["PlacedIndex"]

_Index = TypeVar("_Index", bound="PlacedIndex")


class PlacedIndex:
    """A faiss index placed on the CPU or GPUs, saved and loaded with checksums; the base of
    :class:`~retrieval.index.EmbeddingIndex`, which builds it and searches it."""

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
        self._bytes_per_vector = _structure.bytes_per_vector(faiss, cpu_index)
        self._min_train_rows = _structure.min_train_rows(faiss, cpu_index)  # GPU forms hide it
        self._place(faiss, cpu_index)

    def _place(self, faiss: Any, cpu_index: Any) -> None:
        """Put ``cpu_index`` where ``use_gpu`` asks: sharded over all GPUs when there are
        several, else per :func:`~retrieval.index._faiss.to_gpu`."""
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
        cls: type[_Index],
        path: str | os.PathLike[str],
        dim: int | None = None,
        factory: str | None = None,
        use_gpu: bool | None = None,
        search_params: str = "",
        sha256: str | None = None,
        gpu_temp_memory: int | None = None,
    ) -> _Index:
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
        what = factory if factory is not None else _structure.describe(faiss, index)
        _structure.apply_search_params(faiss, index, search_params, what)
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

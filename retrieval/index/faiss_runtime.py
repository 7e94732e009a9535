"""The lazy ``faiss`` import and GPU placement: the one place that talks to faiss's GPU API.

Nothing here imports faiss at module import time, so the package imports without it and a
missing install fails with a clear ImportError only when an index is actually needed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def import_faiss() -> Any:
    """Return the ``faiss`` module, or raise an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "retrieval.index needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12 for GPU search)"
        ) from err
    return faiss


def gpu_available(faiss: Any) -> bool:
    """True when the installed faiss build has GPU support and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return (
        get_num_gpus is not None
        and hasattr(faiss, "StandardGpuResources")
        and hasattr(faiss, "index_cpu_to_gpu")
        and get_num_gpus() > 0
    )


def check_temp_memory(gpu_temp_memory: int | None) -> int | None:
    """Validate the ``gpu_temp_memory`` option: ``None`` or a byte count >= 0."""
    if gpu_temp_memory is None:
        return None
    if (
        isinstance(gpu_temp_memory, bool)
        or not isinstance(gpu_temp_memory, (int, np.integer))
        or gpu_temp_memory < 0
    ):
        raise ValueError(
            f"gpu_temp_memory must be None or a number of bytes >= 0, got {gpu_temp_memory!r}"
        )
    return int(gpu_temp_memory)


def to_gpu(
    faiss: Any, cpu_index: Any, use_gpu: bool | None, temp_memory: int | None, what: str
) -> tuple[Any, Any]:
    """Place ``cpu_index`` on GPU 0 when asked and possible.

    Args:
        faiss: the faiss module.
        cpu_index: a CPU faiss index of any type.
        use_gpu: ``False`` keeps the CPU index; ``None`` moves it when faiss has a GPU and
            can convert this index type, else keeps it on the CPU; ``True`` requires both.
        temp_memory: bytes of FAISS GPU scratch memory (``setTempMemory``); ``None`` keeps
            the FAISS default.
        what: how to name the index in messages (its factory string).

    Returns:
        ``(index, gpu_resources)``; ``gpu_resources`` is ``None`` for a CPU index and must be
        kept alive as long as the GPU index is.

    Raises:
        RuntimeError: ``use_gpu=True`` but faiss has no usable GPU.
        ValueError: ``use_gpu=True`` but faiss cannot put this index type on a GPU.
    """
    if use_gpu is False:
        return cpu_index, None
    if not gpu_available(faiss):
        if use_gpu:
            raise RuntimeError("use_gpu=True but the installed faiss has no usable GPU")
        return cpu_index, None
    resources = faiss.StandardGpuResources()
    if temp_memory is not None:
        resources.setTempMemory(temp_memory)
    try:
        return faiss.index_cpu_to_gpu(resources, 0, cpu_index), resources
    except RuntimeError as err:  # e.g. "This index type is not implemented on GPU." (HNSW)
        if use_gpu:
            raise ValueError(
                f"faiss cannot put a {what!r} index on the GPU ({err}); "
                "pass use_gpu=None to fall back to the CPU"
            ) from err
        log.info("faiss cannot put a %r index on the GPU (%s); it stays on the CPU", what, err)
        return cpu_index, None


def to_cpu(faiss: Any, index: Any, on_gpu: bool) -> Any:
    """The CPU form of ``index``: a copy when it lives on a GPU, else ``index`` itself."""
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def to_all_gpus(
    faiss: Any, cpu_index: Any, use_gpu: bool | None, temp_memory: int | None, what: str
) -> tuple[Any, Any]:
    """``cpu_index`` sharded over every GPU faiss sees (``GpuMultipleClonerOptions.shard``:
    each GPU holds 1/n of the vectors, searches merge the n results); ``(index, resources)``,
    or ``(cpu_index, None)`` for a type faiss cannot shard when ``use_gpu`` is None."""
    resources = [faiss.StandardGpuResources() for _ in range(faiss.get_num_gpus())]
    for res in resources:
        if temp_memory is not None:
            res.setTempMemory(temp_memory)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    try:
        return faiss.index_cpu_to_gpu_multiple_py(resources, cpu_index, options), resources
    except RuntimeError as err:  # HNSW, and types IndexShards does not implement
        if use_gpu:
            raise ValueError(f"faiss cannot shard a {what!r} index over GPUs ({err})") from err
        log.info("faiss cannot shard a %r index over GPUs (%s); it stays on the CPU", what, err)
        return cpu_index, None


def place(
    faiss: Any, cpu_index: Any, use_gpu: bool | None, temp_memory: int | None, what: str
) -> tuple[Any, Any]:
    """``(index, gpu_resources)``: ``cpu_index`` where ``use_gpu`` asks: sharded over all GPUs
    (:func:`to_all_gpus`, resources a list) when there are several, else per :func:`to_gpu`."""
    args = (faiss, cpu_index, use_gpu, temp_memory, what)
    several = use_gpu is not False and gpu_available(faiss) and faiss.get_num_gpus() > 1
    return to_all_gpus(*args) if several else to_gpu(*args)


def keep_numpy_search_params() -> int:
    """Give FAISS's ``search`` back its ``params`` keyword for numpy input, where
    ``faiss.contrib.torch_utils`` took it away; returns how many index classes were mended.

    That module (imported by pytorch-metric-learning's inference utilities) replaces the
    ``search`` of every FAISS index class, process-wide, with one that takes torch tensors but
    no ``params``; Milvus Lite, run inside the process, searches its FAISS indexes with
    ``params``, and fails once anything imported it. The mended method calls FAISS's own
    numpy search (``search_numpy``) for numpy input and the torch one otherwise. Cheap when
    there is nothing to mend; a FAISS that is not installed mends nothing."""
    try:
        faiss = import_faiss()
    except ImportError:
        return 0
    # torch_utils replaces the search of faiss.Index along with its subclasses' (one test per
    # call: this runs before every Milvus Lite search)
    if _replaced(faiss.Index) is None:
        return 0
    mended = 0
    for cls in vars(faiss).values():
        search = _replaced(cls) if isinstance(cls, type) else None
        if search is not None:
            cls.search = _numpy_params_search(search)
            mended += 1
    return mended


def _replaced(cls: type) -> Any:
    """``cls``'s own ``search`` when it is ``faiss.contrib.torch_utils``' replacement, else
    None."""
    search = cls.__dict__.get("search")
    return search if getattr(search, "__name__", "") == "torch_replacement_search" else None


def _numpy_params_search(torch_search: Any) -> Any:
    def search(self: Any, x: Any, k: int, *args: Any, params: Any = None, **kwargs: Any) -> Any:
        if isinstance(x, np.ndarray):
            return self.search_numpy(x, k, *args, params=params, **kwargs)
        return torch_search(self, x, k, *args, **kwargs)

    return search

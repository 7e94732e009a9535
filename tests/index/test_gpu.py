"""GPU placement logic, exercised with a fake GPU-enabled faiss (no GPU is needed).

The fake delegates everything to the real faiss except the GPU API: ``index_cpu_to_gpu``
"converts" by cloning (and refuses HNSW, as real faiss does), so the CPU code path does the
actual search while the tests check what was asked of the GPU API.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex, knn_recall
from retrieval.index.faiss_runtime import gpu_available, import_faiss
from tests.index.synthetic import brute_force, unit


class _FakeResources:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self._log = log
        log.append(("resources", None))

    def setTempMemory(self, nbytes: int) -> None:  # noqa: N802 (faiss's name)
        self._log.append(("temp_memory", nbytes))


class _FakeGpuFaiss:
    """The real faiss module plus a fake GPU API that records its calls in ``log``."""

    def __init__(self, real: Any, num_gpus: int = 1) -> None:
        self._real = real
        self._num_gpus = num_gpus
        self.log: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def get_num_gpus(self) -> int:
        return self._num_gpus

    def StandardGpuResources(self) -> _FakeResources:  # noqa: N802 (faiss's name)
        return _FakeResources(self.log)

    def index_cpu_to_gpu(self, resources: Any, device: int, index: Any) -> Any:
        if isinstance(self._real.downcast_index(index), self._real.IndexHNSW):
            raise RuntimeError("This index type is not implemented on GPU.")
        self.log.append(("to_gpu", device))
        return self._real.clone_index(index)

    def index_gpu_to_cpu(self, index: Any) -> Any:
        self.log.append(("to_cpu", None))
        return self._real.clone_index(index)


@pytest.fixture
def fake_faiss(monkeypatch: pytest.MonkeyPatch) -> _FakeGpuFaiss:
    fake = _FakeGpuFaiss(import_faiss())
    monkeypatch.setitem(sys.modules, "faiss", fake)
    assert import_faiss() is fake and gpu_available(fake)
    return fake


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_auto_puts_any_convertible_index_on_gpu0_with_temp_memory(fake_faiss, factory):
    rng = np.random.default_rng(0)
    xb, xq = unit(rng.standard_normal((300, 8))), unit(rng.standard_normal((10, 8)))
    index = EmbeddingIndex(8, factory, search_params="", gpu_temp_memory=1 << 20)
    assert index.on_gpu
    assert fake_faiss.log == [("resources", None), ("temp_memory", 1 << 20), ("to_gpu", 0)]
    index.add(xb)
    _, ids = index.search(xq, 5)
    if factory == "Flat":
        np.testing.assert_array_equal(ids, brute_force(xq, xb, 5)[1])


def test_auto_leaves_unconvertible_index_on_cpu_and_true_raises(fake_faiss):
    index = EmbeddingIndex(8, "HNSW32", gpu_temp_memory=123)
    assert not index.on_gpu
    index.add(unit(np.random.default_rng(1).standard_normal((20, 8))))
    assert index.search(np.eye(8, dtype=np.float32), 1)[1].shape == (8, 1)
    with pytest.raises(ValueError, match="cannot put a 'HNSW32' index on the GPU"):
        EmbeddingIndex(8, "HNSW32", use_gpu=True)


def test_false_never_touches_the_gpu_and_no_gpu_means_cpu(fake_faiss, monkeypatch):
    assert not EmbeddingIndex(8, "Flat", use_gpu=False).on_gpu
    assert fake_faiss.log == []
    no_gpu = _FakeGpuFaiss(fake_faiss._real, num_gpus=0)
    monkeypatch.setitem(sys.modules, "faiss", no_gpu)
    assert not EmbeddingIndex(8, "Flat").on_gpu
    with pytest.raises(RuntimeError, match="no usable GPU"):
        EmbeddingIndex(8, "Flat", use_gpu=True)
    assert no_gpu.log == []


def test_save_load_and_remove_go_through_the_cpu(fake_faiss, tmp_path):
    xb = unit(np.random.default_rng(2).standard_normal((50, 8)))
    index = EmbeddingIndex(8, "Flat", use_gpu=True, gpu_temp_memory=0)
    index.add(xb)
    fake_faiss.log.clear()
    sha = index.save(tmp_path / "gpu.faiss")
    assert fake_faiss.log == [("to_cpu", None)]
    loaded = EmbeddingIndex.load(tmp_path / "gpu.faiss", sha256=sha, gpu_temp_memory=7)
    assert loaded.on_gpu and ("temp_memory", 7) in fake_faiss.log
    fake_faiss.log.clear()
    assert index.remove_ids(np.array([0, 1])) == 2
    assert index.on_gpu and index.ntotal == 48
    assert [name for name, _ in fake_faiss.log] == ["to_cpu", "resources", "temp_memory", "to_gpu"]
    np.testing.assert_array_equal(index.search(xb[2:5], 1)[1][:, 0], [0, 1, 2])


@pytest.mark.gpu
def test_real_gpu_matches_cpu(tmp_path):
    if not gpu_available(import_faiss()):
        pytest.skip("faiss sees no GPU")
    rng = np.random.default_rng(3)
    xb, xq = unit(rng.standard_normal((2000, 32))), unit(rng.standard_normal((50, 32)))
    _, exact = brute_force(xq, xb, 10)
    for factory, params in (("Flat", ""), ("IVF16,Flat", "nprobe=16")):
        gpu = EmbeddingIndex(32, factory, True, params, gpu_temp_memory=64 << 20)
        assert gpu.on_gpu
        gpu.add(xb)
        assert knn_recall(gpu.search(xq, 10)[1], exact) > 0.99
        sha = gpu.save(tmp_path / "i.faiss")
        cpu = EmbeddingIndex.load(tmp_path / "i.faiss", 32, use_gpu=False, sha256=sha)
        assert knn_recall(cpu.search(xq, 10)[1], exact) > 0.99
    assert not EmbeddingIndex(32, "HNSW32").on_gpu

"""An index built from .npy shards chunk by chunk equals a one-shot build; multi-GPU sharding."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex, ShardSet, knn_recall, sample_positions
from retrieval.index.faiss_runtime import gpu_available, import_faiss
from retrieval.index.shards import ShardError, iter_chunks, training_sample, vector_counts
from tests.index.synthetic import brute_force, clustered, unit
from tests.index.test_gpu import _FakeGpuFaiss

SIZES = (700, 0, 1300, 500)  # an empty shard on purpose


@pytest.fixture
def shards(tmp_path: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Four .npy files of clustered unit vectors (32-d), their concatenation and queries."""
    rng = np.random.default_rng(0)
    *parts, xq = clustered(rng, (*SIZES, 50))
    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"shard-{i:05d}.npy")
        np.save(files[-1], part)
    return files, np.concatenate(parts), xq


def build(
    files: list[Path],
    factory: str = "Flat",
    search_params: str = "",
    max_train: int = 100_000,
    seed: int = 0,
    chunk_rows: int = 100_000,
) -> EmbeddingIndex:
    """An index of every row of ``files`` as export.py builds one from shards: trained on
    ``training_sample`` when it needs training, then filled by ``iter_chunks``."""
    index = EmbeddingIndex(32, factory, use_gpu=False, search_params=search_params)
    if not index.is_trained:
        sample = training_sample(files, max_train, seed)
        index.train(sample, max_train=sample.shape[0], seed=seed)
    add_chunks(index, files, chunk_rows)
    return index


def add_chunks(index: EmbeddingIndex, files: list[Path], chunk_rows: int) -> None:
    for chunk in iter_chunks(files, chunk_rows):
        index.add(chunk)


def test_chunks_span_files_in_order(shards):
    files, xb, _ = shards
    assert vector_counts(files) == list(SIZES)
    chunks = list(iter_chunks(files, chunk_rows=600))
    assert [len(c) for c in chunks] == [600, 600, 600, 600, 100]
    assert all(c.dtype == np.float32 and c.flags.c_contiguous for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), xb)
    with pytest.raises(ValueError, match="chunk_rows"):
        next(iter_chunks(files, 0))


def test_training_sample_is_the_one_shot_sample(shards):
    files, xb, _ = shards
    for max_rows, seed in ((1000, 0), (1000, 7), (5000, 0)):
        expected = xb[sample_positions(len(xb), max_rows, seed)]
        np.testing.assert_array_equal(training_sample(files, max_rows, seed), expected)


def test_flat_chunked_build_is_identical_to_one_shot(shards):
    files, xb, xq = shards
    chunked = build(files, "Flat", chunk_rows=333)
    once = EmbeddingIndex(32, "Flat", use_gpu=False)
    once.add(xb)
    assert chunked.ntotal == once.ntotal == len(xb)
    d1, i1 = chunked.search(xq, 10)
    d2, i2 = once.search(xq, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, brute_force(xq, xb, 10)[1])


def test_ivf_pq_chunked_add_with_the_same_trained_index_is_identical(shards, tmp_path):
    files, xb, xq = shards
    trained = EmbeddingIndex(32, "IVF16,PQ8np", use_gpu=False, search_params="nprobe=4")
    trained.train(training_sample(files, 2000))
    trained.save(tmp_path / "trained.faiss")
    load = lambda: EmbeddingIndex.load(tmp_path / "trained.faiss", use_gpu=False)  # noqa: E731
    chunked, once = load(), load()
    add_chunks(chunked, files, chunk_rows=256)
    once.add(xb)
    d1, i1 = chunked.search(xq, 10)
    d2, i2 = once.search(xq, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)
    assert knn_recall(i1, brute_force(xq, xb, 10)[1]) > 0.5  # a real index, not noise


def test_a_chunked_build_trains_on_the_sample_a_one_shot_add_would_use(shards):
    files, xb, xq = shards
    chunked = build(files, "IVF16,Flat", "nprobe=16", max_train=1000, seed=0, chunk_rows=400)
    once = EmbeddingIndex(32, "IVF16,Flat", use_gpu=False, search_params="nprobe=16")
    once.train(xb, max_train=1000, seed=0)
    once.add(xb)
    np.testing.assert_array_equal(chunked.search(xq, 10)[1], once.search(xq, 10)[1])


def test_bad_files_are_refused(shards, tmp_path):
    files, _, _ = shards
    np.save(tmp_path / "f64.npy", np.zeros((3, 32)))
    np.save(tmp_path / "d16.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(ValueError, match="f64.npy: need a 2-D float32"):
        vector_counts([*files, tmp_path / "f64.npy"])
    with pytest.raises(ValueError, match="different dimensions"):
        vector_counts([*files, tmp_path / "d16.npy"])


def test_shard_set_refuses_unfinished_folders(tmp_path):
    with pytest.raises(ShardError, match="not a shards folder"):
        ShardSet.open(tmp_path)
    plan = {"format": "retrieval-shards", "dim": 4, "num_shards": 2}
    (tmp_path / "shards.json").write_text(json.dumps(plan))
    np.save(tmp_path / "shard-00000.npy", unit(np.ones((2, 4))))
    record = {"count": 2, "items": [], "skipped": [], "npy_sha256": "0" * 64}
    (tmp_path / "shard-00000.ids.json").write_text(json.dumps(record))
    np.save(tmp_path / "shard-00001.npy", unit(np.ones((2, 4))))  # no .ids.json: unfinished
    with pytest.raises(ShardError, match=r"1 of 2 shards are not finished \(shard 1: not written"):
        ShardSet.open(tmp_path)


# ---------------------------------------------------------------- several GPUs


class _FakeOptions:
    shard = False


class _FakeMultiGpuFaiss(_FakeGpuFaiss):
    """Two fake GPUs: ``index_cpu_to_gpu_multiple_py`` records the call and clones."""

    def GpuMultipleClonerOptions(self) -> _FakeOptions:  # noqa: N802 (faiss's name)
        return _FakeOptions()

    def index_cpu_to_gpu_multiple_py(self, resources: list, index: Any, co: Any) -> Any:
        if isinstance(self._real.downcast_index(index), self._real.IndexHNSW):
            raise RuntimeError("IndexShards implemented only for IndexIVFFlat, ...")
        self.log.append(("to_all_gpus", (len(resources), co.shard)))
        return self._real.clone_index(index)


def test_several_gpus_shard_the_index_and_changes_go_through_the_cpu(monkeypatch, tmp_path):
    fake = _FakeMultiGpuFaiss(import_faiss(), num_gpus=2)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    rng = np.random.default_rng(1)
    xb, xq = unit(rng.standard_normal((400, 8))), unit(rng.standard_normal((20, 8)))
    index = EmbeddingIndex(8, "IVF8,Flat", search_params="nprobe=8", gpu_temp_memory=1 << 20)
    assert index.on_gpu
    assert fake.log.count(("temp_memory", 1 << 20)) == 2
    assert fake.log[-1] == ("to_all_gpus", (2, True))
    fake.log.clear()
    index.add(xb[:200])  # trains on the CPU form, then adds there: one quantizer
    index.add(xb[200:])
    calls = [name for name, _ in fake.log]
    assert calls.count("to_cpu") == 3 and calls.count("to_all_gpus") == 3  # train, add, add
    np.testing.assert_array_equal(index.search(xq, 5)[1], brute_force(xq, xb, 5)[1])
    assert index.remove_ids(np.arange(10)) == 10 and index.ntotal == 390
    assert fake.log[-1][0] == "to_all_gpus"
    assert not EmbeddingIndex(8, "HNSW32").on_gpu  # cannot be sharded: stays on the CPU
    with pytest.raises(ValueError, match="cannot shard a 'HNSW32' index"):
        EmbeddingIndex(8, "HNSW32", use_gpu=True)
    assert not EmbeddingIndex(8, "Flat", use_gpu=False).on_gpu


@pytest.mark.gpu
def test_real_gpus_shard_a_built_index(shards, tmp_path):
    """Several real GPUs: a CPU-built index loaded onto all of them searches like the CPU."""
    faiss = import_faiss()
    if not gpu_available(faiss) or faiss.get_num_gpus() < 2:
        pytest.skip("needs faiss with at least 2 GPUs")
    files, xb, xq = shards
    for factory, params in (("Flat", ""), ("IVF16,Flat", "nprobe=16")):
        sha = build(files, factory, params).save(tmp_path / "i.faiss")
        gpus = EmbeddingIndex.load(tmp_path / "i.faiss", sha256=sha, search_params=params)
        assert gpus.on_gpu and isinstance(gpus._gpu_resources, list)
        cpu = EmbeddingIndex.load(tmp_path / "i.faiss", use_gpu=False, search_params=params)
        assert knn_recall(gpus.search(xq, 10)[1], cpu.search(xq, 10)[1]) > 0.99
        gpus.add(xb[:10])
        assert gpus.ntotal == len(xb) + 10

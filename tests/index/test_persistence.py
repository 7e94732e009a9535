"""EmbeddingIndex.save / load: round trips, atomic writes, checksums and clear errors."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex
from retrieval.index.faiss_runtime import import_faiss
from tests.index.synthetic import clustered, unit

ROUND_TRIP = [
    ("Flat", "", "Flat"),
    ("HNSW32", "efSearch=32", "HNSW32"),
    ("IVF16,PQ8np", "nprobe=4", "IVF16,PQ8x8"),
]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    xb, xq = clustered(np.random.default_rng(0), (1000, 30))
    return xb, xq


def _built(factory: str, xb: np.ndarray, search_params: str = "") -> EmbeddingIndex:
    index = EmbeddingIndex(32, factory, use_gpu=False, search_params=search_params)
    index.train(xb)
    index.add(xb)
    return index


@pytest.mark.parametrize(("factory", "params", "described"), ROUND_TRIP)
def test_round_trip_gives_identical_results(tmp_path, data, factory, params, described):
    xb, xq = data
    index = _built(factory, xb, params)
    path = tmp_path / "index.faiss"
    sha = index.save(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]
    # faiss files keep nprobe / efSearch, so "" search_params reproduces the saved index
    loaded = EmbeddingIndex.load(path, dim=32, use_gpu=False, sha256=sha.upper())
    assert (loaded.dim, loaded.ntotal, loaded.factory) == (32, 1000, described)
    assert loaded.bytes_per_vector == index.bytes_per_vector
    for got, want in zip(loaded.search(xq, 10), index.search(xq, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    named = EmbeddingIndex.load(path, factory=factory, search_params=params, use_gpu=False)
    assert (named.factory, named.search_params) == (factory, params)


def test_load_search_params_override_saved_ones(tmp_path):
    rng = np.random.default_rng(1)  # unclustered, so one probe misses neighbours
    xb, xq = unit(rng.standard_normal((1000, 32))), unit(rng.standard_normal((30, 32)))
    _built("IVF16,Flat", xb, "nprobe=16").save(tmp_path / "ivf.faiss")
    exact = _built("Flat", xb).search(xq, 10)[1]
    saved = EmbeddingIndex.load(tmp_path / "ivf.faiss", use_gpu=False)
    np.testing.assert_array_equal(saved.search(xq, 10)[1], exact)
    one_probe = EmbeddingIndex.load(tmp_path / "ivf.faiss", search_params="nprobe=1")
    assert not np.array_equal(one_probe.search(xq, 10)[1], exact)


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, data, monkeypatch):
    xb, _ = data
    path = tmp_path / "index.faiss"
    old_sha = _built("Flat", xb[:10]).save(path)
    faiss = import_faiss()
    written: list[str] = []

    def partial_write(index, fname):
        written.append(fname)
        with open(fname, "wb") as f:
            f.write(b"IxF2" + b"\0" * 10)
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", partial_write)
    with pytest.raises(RuntimeError, match="disk full"):
        _built("Flat", xb).save(path)
    assert os.path.dirname(written[0]) == str(tmp_path) and written[0] != str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == old_sha
    monkeypatch.undo()
    assert EmbeddingIndex.load(path, sha256=old_sha).ntotal == 10


def test_checksum_is_checked_before_faiss_reads(tmp_path, data, monkeypatch):
    path = tmp_path / "index.faiss"
    sha = _built("Flat", data[0][:10]).save(path)
    with path.open("r+b") as f:  # flip one byte of the stored vectors
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))

    def must_not_read(fname):
        raise AssertionError("faiss.read_index called on an unverified file")

    monkeypatch.setattr(import_faiss(), "read_index", must_not_read)
    with pytest.raises(ValueError, match=rf"index file {path} has sha256 .*expected {sha}"):
        EmbeddingIndex.load(path, sha256=sha)
    for bad in ("abc", "g" * 64):
        with pytest.raises(ValueError, match="64 hex digits"):
            EmbeddingIndex.load(path, sha256=bad)


def test_load_errors_name_the_file(tmp_path, data):
    faiss = import_faiss()
    path = tmp_path / "index.faiss"
    _built("Flat", data[0][:10]).save(path)
    with pytest.raises(ValueError, match=f"index at {path} has dim 32, expected 16"):
        EmbeddingIndex.load(path, dim=16)
    with pytest.raises(ValueError, match="dim must be"):
        EmbeddingIndex.load(path, dim=0)
    content = path.read_bytes()
    for n in (0, 10, len(content) // 2, len(content) - 1):
        path.write_bytes(content[:n])
        with pytest.raises(ValueError, match=f"cannot read the index file {path}: it is trunc"):
            EmbeddingIndex.load(path)
    path.write_bytes(b"not an index at all" * 10)
    with pytest.raises(ValueError, match=f"cannot read the index file {path}"):
        EmbeddingIndex.load(path)
    with pytest.raises(FileNotFoundError, match=f"no index file at {tmp_path / 'missing'}"):
        EmbeddingIndex.load(tmp_path / "missing")
    faiss.write_index(faiss.IndexFlatL2(32), str(tmp_path / "l2.faiss"))
    with pytest.raises(ValueError, match="uses metric L2, expected inner product"):
        EmbeddingIndex.load(tmp_path / "l2.faiss")


def test_save_into_missing_folder_fails_clearly(tmp_path):
    index = EmbeddingIndex(4, use_gpu=False)
    with pytest.raises(FileNotFoundError, match="folder .*nowhere does not exist"):
        index.save(tmp_path / "nowhere" / "index.faiss")
    assert list(tmp_path.iterdir()) == []

"""bytes_per_vector against faiss's serialised sizes, and remove_ids on each index type."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import EmbeddingIndex
from retrieval.index.faiss_runtime import import_faiss
from tests.index.synthetic import brute_force, unit

D = 32


@pytest.fixture(scope="module")
def xb() -> np.ndarray:
    return unit(np.random.default_rng(0).standard_normal((3000, D)))


def _serialized_size(index: EmbeddingIndex) -> int:
    faiss = import_faiss()
    return len(faiss.serialize_index(index._index))


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("Flat", 4 * D),
        ("HNSW32", None),  # 4 * D + ~65 int32 links + 12 bytes of offsets and level
        ("IVF64,Flat", 4 * D + 8),
        ("IVF64,PQ8np", 8 + 8),  # "np": the same index, without the 6 s polysemous training
        ("PCA16,IVF16,SQ8", 16 + 8),
    ],
)
def test_bytes_per_vector_is_what_a_vector_adds_to_the_file(xb, factory, expected):
    index = EmbeddingIndex(D, factory, use_gpu=False)
    index.train(xb, max_train=1024)  # keeps PQ training short
    index.add(xb[:1000])
    before = _serialized_size(index)
    index.add(xb[1000:])
    marginal = (_serialized_size(index) - before) / 2000
    assert index.bytes_per_vector == pytest.approx(marginal, rel=0.02)
    if expected is not None:
        assert index.bytes_per_vector == expected
    else:
        assert 4 * D + 4 * 64 + 12 < index.bytes_per_vector < 4 * D + 4 * 66 + 12
    if factory in ("Flat", "HNSW32"):  # no large fixed part: the whole file per vector agrees
        assert index.bytes_per_vector == pytest.approx(_serialized_size(index) / 3000, rel=0.1)


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "PQ4np", "PCA16,IVF16,Flat"])
def test_remove_ids_renumbers_like_deleting_rows(xb, factory):
    index = EmbeddingIndex(D, factory, use_gpu=False, search_params=_probe_all(factory))
    index.train(xb, max_train=1024)  # keeps PQ training short
    index.add(xb[:200])
    assert index.remove_ids(np.array([150, 3, 7, 7])) == 3
    assert index.remove_ids(np.array([], dtype=np.int64)) == 0
    kept = np.delete(xb[:200], [3, 7, 150], axis=0)
    index.add(xb[200:210])  # new ids continue at ntotal, no collision with kept ids
    assert index.ntotal == 207
    expected = np.concatenate([kept, xb[200:210]])
    _, ids = index.search(expected, 1)
    if factory in ("PQ4np", "PCA16,IVF16,Flat"):  # lossy: a vector may not be its own top hit
        assert np.mean(ids[:, 0] == np.arange(207)) > 0.9
    else:
        np.testing.assert_array_equal(ids[:, 0], np.arange(207))
        if factory == "Flat":
            np.testing.assert_array_equal(
                index.search(xb[:5], 4)[1], brute_force(xb[:5], expected, 4)[1]
            )


def _probe_all(factory: str) -> str:
    return "nprobe=16" if "IVF" in factory else ""


def test_remove_ids_errors(xb):
    hnsw = EmbeddingIndex(D, "HNSW32", use_gpu=False)
    hnsw.add(xb[:20])
    with pytest.raises(ValueError, match="HNSW indexes cannot remove vectors; rebuild"):
        hnsw.remove_ids(np.array([1]))
    assert hnsw.ntotal == 20
    flat = EmbeddingIndex(D, use_gpu=False)
    flat.add(xb[:20])
    for bad, match in [
        (np.array([20]), r"\[0, 20\)"),
        (np.array([-1]), r"\[0, 20\)"),
        (np.array([[1]]), "1-D"),
        (np.array([1.0]), "integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            flat.remove_ids(bad)
    assert flat.ntotal == 20

"""A gallery as a bundle indexes it (:mod:`retrieval.bundle.gallery`): embedded images as one
chunk through the whitening and DBA, and shards streamed chunk by chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from retrieval.bundle.gallery import image_gallery, shard_gallery
from retrieval.bundle.writer import GalleryItem
from retrieval.data.manifest import ManifestRow
from retrieval.index.shards import ShardContent, ShardItem, ShardPlan, ShardSet, embed_shards
from retrieval.postprocess import DBA, database_augment, fit_whitening
from retrieval.postprocess.steps import normalize_rows


def _unit(rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).standard_normal((rows, dim)))


def _rows(folder: Path, count: int) -> list[ManifestRow]:
    folder.mkdir()
    rows = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        path.write_bytes(f"image {i}".encode())
        rows.append(ManifestRow(path, "" if i == 0 else f"label{i % 2}", "test", extra={"n": i}))
    return rows


def test_embedded_images_are_one_chunk_whitened_then_augmented(tmp_path: Path):
    rows, vectors = _rows(tmp_path / "images", 6), _unit(6)
    plain = image_gallery("here", rows, vectors)
    items = plain.items
    assert items is not None and items[0] == GalleryItem(
        str((tmp_path / "images" / "0.jpg").resolve()),
        None,
        {"n": 0},
        hashlib.sha256(b"image 0").hexdigest(),
    )
    assert items[1].label == "label1" and plain.description == {"source": "here"}
    (chunk,) = plain.chunks
    np.testing.assert_array_equal(chunk[1], vectors)
    assert plain.dim == 8 and plain.train_vectors is chunk[1]

    whitening = fit_whitening(_unit(50, seed=1), dim=4)
    dba = DBA(k=2, alpha=3.0)
    stepped = image_gallery("here", rows, vectors, whitening, dba)
    (chunk,) = stepped.chunks
    whitened = whitening.apply(vectors)
    np.testing.assert_array_equal(chunk[2], whitened)  # the plain vectors kept beside
    np.testing.assert_array_equal(chunk[1], database_augment(whitened, 2, 3.0))
    assert stepped.dim == 4 and stepped.train_vectors is chunk[1]


def test_shards_are_streamed_whitened_chunk_by_chunk(tmp_path: Path):
    vectors = _unit(25, seed=2)
    items = [ShardItem(f"/images/{i:02d}.jpg", "x", {"n": i}, sha256="ab") for i in range(25)]

    def embed(shard: int, chosen: list[ShardItem]) -> ShardContent:
        return ShardContent(vectors[shard * 10 : shard * 10 + len(chosen)], chosen)

    header = {"dim": 8, "model_fingerprint": "test", "preprocessing": {}, "source": "/images"}
    embed_shards(tmp_path / "shards", ShardPlan(items, 10), header, embed)
    shards = ShardSet.open(tmp_path / "shards")
    whitening = fit_whitening(_unit(50, seed=1), dim=4)
    gallery = shard_gallery(shards, chunk_rows=7, max_train=100, whitening=whitening)
    assert gallery.items is None  # streamed, not held
    assert gallery.dim == 4 and gallery.description == {
        "source": "/images",
        "shards": str((tmp_path / "shards").resolve()),
        "skipped_unreadable": 0,
    }
    chunks = list(gallery.chunks)
    assert [len(c[0]) for c in chunks] == [7, 7, 7, 4]
    assert chunks[0][0][3] == GalleryItem("/images/03.jpg", "x", {"n": 3}, "ab")
    got = np.concatenate([c[1] for c in chunks])
    np.testing.assert_allclose(got, whitening.apply(vectors), atol=1e-6)
    assert gallery.train_vectors.shape == (25, 4)
    assert shard_gallery(shards, 7, 100).dim == 8

"""A real small bundle (EfficientNet-Lite0 at 64 px over 40 demo images), written once per session.

Tests that change a bundle take ``bundle_copy`` (a fresh copy per test); ``bundle_template``
itself is never opened by a test, so every copy starts from the same state.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from retrieval.bundle.writer import GalleryItem, write_bundle
from retrieval.data.images import open_rgb as load_rgb
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.transforms import eval_transform
from retrieval.datasets.demo import render_demo_image
from retrieval.models import Embedder, create_backbone

INPUT_SIZE = 64
NUM_LABELS, PER_LABEL = 10, 4
MODEL_CONFIG = {
    "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
    "embedder": {"embedding_dim": None, "pooling": "avg", "head_bn": False},
}
METRICS = {"test/recall@1": 0.875, "test/map@r": 0.5}


@dataclass(frozen=True)
class Gallery:
    """The bundled images: ``paths[i]`` has label ``labels[i]`` and vector ``vectors[i]``."""

    root: Path
    paths: list[Path]
    labels: list[str]
    vectors: np.ndarray


def sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_images(folder: Path, count: int, seed: int = 7) -> list[Path]:
    """``count`` demo-style JPEGs not in the gallery (another seed), written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"new_{seed}_{i:02d}.jpg"
        render_demo_image(seed, i, 0, image_size=96).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def transformed_copy(path: Path) -> bytes:
    """``path`` cropped by a few pixels, resized, 10% brighter and re-encoded as JPEG q80."""
    image = load_rgb(path)
    width, height = image.size
    image = image.crop((3, 2, width - 4, height - 3)).resize((80, 80), Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(1.1)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def reference_embed(embedder: Embedder, pre: Preprocessing, images: list) -> np.ndarray:
    """(n, d) embeddings from the PyTorch model on ``eval_transform(pre)`` of PIL images."""
    transform = eval_transform(pre)
    with torch.inference_mode():
        batch = torch.stack([transform(image) for image in images])
        return embedder(batch).float().numpy()


@pytest.fixture(scope="session")
def gallery_embedder() -> Embedder:
    """Pretrained EfficientNet-Lite0 (ImageNet weights from the installed package), avg-pooled."""
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True)
    return Embedder(backbone, embedding_dim=None, pooling="avg").eval()


@pytest.fixture(scope="session")
def gallery_pre(gallery_embedder: Embedder) -> Preprocessing:
    return gallery_embedder.preprocessing.with_size(INPUT_SIZE)


@pytest.fixture(scope="session")
def gallery(
    tmp_path_factory: pytest.TempPathFactory, gallery_embedder: Embedder, gallery_pre: Preprocessing
) -> Gallery:
    """40 demo images (10 labels x 4, 96 px) and their PyTorch embeddings."""
    from retrieval.datasets.demo import prepare_demo

    root = tmp_path_factory.mktemp("gallery").resolve() / "demo"
    manifest = prepare_demo(root, num_labels=NUM_LABELS, images_per_label=PER_LABEL, image_size=96)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    paths = [root / row["path"] for row in rows]
    labels = [row["label"] for row in rows]
    vectors = reference_embed(gallery_embedder, gallery_pre, [load_rgb(p) for p in paths])
    return Gallery(root, paths, labels, np.ascontiguousarray(vectors, dtype=np.float32))


@pytest.fixture(scope="session")
def bundle_template(
    tmp_path_factory: pytest.TempPathFactory,
    gallery_embedder: Embedder,
    gallery_pre: Preprocessing,
    gallery: Gallery,
) -> Path:
    """The bundle as written by ``write_bundle``; copy it before opening (see ``bundle_copy``)."""
    items = [
        GalleryItem(uri=str(path), label=label, content_sha256=sha256_bytes(path))
        for path, label in zip(gallery.paths, gallery.labels, strict=True)
    ]
    return write_bundle(
        tmp_path_factory.mktemp("template") / "bundle",
        gallery_embedder,
        MODEL_CONFIG,
        gallery_pre,
        items,
        gallery.vectors,
        description={
            "metrics": METRICS,
            "protocol": {"model": {"backbone": "tf_efficientnet_lite0"}},
        },
    )


@pytest.fixture
def bundle_copy(bundle_template: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the bundle that a test may change or damage (deleted afterwards: it
    weighs ~40 MB)."""
    folder = Path(shutil.copytree(bundle_template, tmp_path / "bundle"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def negate_stored_vector(bundle: Path, item_id: int) -> None:
    """Flip the sign of one stored vector behind the bundle's back (it must not be open): the
    index snapshot still holds the old vector, so only ``verify`` notices."""
    import sqlite3

    conn = sqlite3.connect(bundle / "items.sqlite")
    try:
        (blob,) = conn.execute("SELECT vector FROM items WHERE id = ?", (item_id,)).fetchone()
        flipped = (-np.frombuffer(blob, dtype="<f4")).astype("<f4").tobytes()
        with conn:
            conn.execute("UPDATE items SET vector = ? WHERE id = ?", (flipped, item_id))
    finally:
        conn.close()


#: The ``openvino`` runtime kind as a test parameter, skipped where OpenVINO is not installed
#: (it runs the bundle's ONNX file; the ``openvino`` extra).
OPENVINO = pytest.param(
    "openvino",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("openvino") is None,
        reason="openvino is not installed (pip install -e '.[openvino]')",
    ),
)

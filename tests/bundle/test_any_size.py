"""resize_mode=short and long: images keep their aspect (short or long side = input size), so
the exported model takes any height and width, batches hold one shape each, and every path
gives the vectors the PyTorch model gives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.bundle.model_export import export_model
from retrieval.bundle.runtime import load_runtime
from retrieval.data.dataset import ImageDataset, eval_loader
from retrieval.data.manifest import ManifestRow
from retrieval.data.preprocessing import (
    MAX_ASPECT,
    kept_aspect_size,
    long_side_size,
    short_side_size,
)
from retrieval.data.transforms import eval_transform
from retrieval.models import Embedder, create_backbone

SIDE = 64
SHAPES = [(64, 64), (64, 96), (150, 64)]  # (height, width) of the three aspect ratios


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(0)
    backbone = create_backbone("test_convnext", pretrained=False)
    return Embedder(backbone, 32, "gem").eval()


def _config() -> dict:
    return {
        "backbone": {"name": "test_convnext", "source": "timm", "kwargs": {}},
        "embedder": {"embedding_dim": 32, "pooling": "gem", "head_bn": False},
    }


def test_short_side_size_keeps_the_aspect_up_to_the_cap() -> None:
    assert short_side_size(400, 300, 224) == (299, 224)
    assert short_side_size(300, 400, 224) == (224, 299)
    assert short_side_size(224, 224, 224) == (224, 224)
    assert short_side_size(1000, 100, 224) == (int(MAX_ASPECT * 224), 224)
    assert short_side_size(1, 5000, 32) == (32, int(MAX_ASPECT * 32))


def test_long_side_size_keeps_the_aspect_down_to_the_cap() -> None:
    assert long_side_size(1600, 1200, 1024) == (1024, 768)
    assert long_side_size(1200, 1600, 1024) == (768, 1024)
    assert long_side_size(1024, 1024, 1024) == (1024, 1024)
    assert long_side_size(333, 500, 1024) == (682, 1024)  # 681.98 rounds up
    assert long_side_size(10, 20, 1024) == (512, 1024)  # upscaled too
    assert long_side_size(1000, 100, 224) == (224, int(224 / MAX_ASPECT))
    assert long_side_size(1, 5000, 33) == (17, 33)  # ceil(33 / 2)
    assert kept_aspect_size(400, 300, 224, "long") == (224, 168)
    assert kept_aspect_size(400, 300, 224, "short") == (299, 224)
    with pytest.raises(ValueError, match="'pad' does not keep the aspect"):
        kept_aspect_size(400, 300, 224, "pad")


@pytest.mark.parametrize("runtime", ["onnx", "torchscript", "openvino"])
def test_dynamic_size_model_equals_pytorch_on_three_aspect_ratios(
    tmp_path, embedder: Embedder, runtime: str
) -> None:
    if runtime == "openvino":
        pytest.importorskip("openvino")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(embedder, tmp_path, _config(), SIDE, any_size=True)
    model = load_runtime(tmp_path, runtime, device="cpu")
    assert model.any_size
    generator = torch.Generator().manual_seed(1)
    for height, width in SHAPES:
        images = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = embedder(images).numpy()
        got = model.embed(images.numpy())
        assert (got * expected).sum(axis=1).min() > 0.9999, (runtime, height, width)


def test_a_square_model_refuses_other_shapes_and_an_any_size_one_checks_a_side(
    tmp_path, embedder: Embedder
) -> None:
    (tmp_path / "square").mkdir()
    (tmp_path / "any").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(embedder, tmp_path / "square", _config(), SIDE)
        export_model(embedder, tmp_path / "any", _config(), SIDE, any_size=True)
    square = load_runtime(tmp_path / "square", "onnx", device="cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        square.embed(np.zeros((1, 3, 64, 96), np.float32))
    anything = load_runtime(tmp_path / "any", "onnx", device="cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) with H or W = 64, got \(1, 3, 80, 96\)"):
        anything.embed(np.zeros((1, 3, 80, 96), np.float32))  # neither side is 64
    assert anything.embed(np.zeros((2, 3, 64, 32), np.float32)).shape == (2, 32)  # long side 64
    mixed = [np.zeros((3, 64, 96), np.float32), np.ones((3, 64, 64), np.float32)]
    rows = anything.embed_many(mixed)
    np.testing.assert_allclose(rows[0], anything.embed(mixed[0][None])[0], atol=1e-6)
    np.testing.assert_allclose(rows[1], anything.embed(mixed[1][None])[0], atol=1e-6)


@pytest.mark.parametrize("mode", ["short", "long"])
def test_numpy_kept_aspect_modes_equal_the_eval_transform(embedder: Embedder, mode: str) -> None:
    pre = embedder.preprocessing.with_size(SIDE, mode)
    transform = eval_transform(pre)
    ours = pre
    rng = np.random.default_rng(0)
    for width, height in [(120, 80), (80, 200), (64, 64), (500, 40)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = transform(image).numpy()
        got = ours(image)
        side = min(got.shape[1:]) if mode == "short" else max(got.shape[1:])
        assert got.shape == expected.shape and side == SIDE, (mode, width, height)
        assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("mode", ["short", "long"])
def test_eval_loader_batches_images_of_one_shape_and_keeps_every_index(
    tmp_path, embedder: Embedder, mode: str
) -> None:
    sizes = [(90, 60), (60, 60), (90, 60), (60, 120), (60, 60), (61, 60), (90, 60)]
    rows = []
    for i, (width, height) in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (width, height), (i * 30, 0, 0)).save(path)
        rows.append(ManifestRow(path, f"l{i}", "test"))
    pre = embedder.preprocessing.with_size(SIDE, mode)
    loader = eval_loader(ImageDataset(rows, eval_transform(pre)), batch_size=2)
    seen = []
    for batch in loader:
        seen += batch["index"].tolist()
        shapes = {tuple(image.shape) for image in batch["image"]}
        assert len(shapes) == 1
    assert sorted(seen) == list(range(len(sizes)))
    square = eval_loader(ImageDataset(rows, eval_transform(pre.with_size(SIDE, "squash"))), 3)
    assert [len(b["index"]) for b in square] == [3, 3, 1]  # one shape: plain order

"""Tests for the bundle's model: export, rebuild and the runtimes against PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from retrieval.bundle.format import BundleError
from retrieval.bundle.model_config import build_embedder, check_model_config, read_model_config
from retrieval.bundle.model_export import export_model
from retrieval.bundle.runtime import Runtime, load_runtime
from retrieval.datasets.demo import render_demo_image
from retrieval.models import Embedder, create_backbone
from tests.bundle_fixtures import OPENVINO

SIZE = 64
CONFIG: dict[str, Any] = {
    "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
    "embedder": {"embedding_dim": 128, "pooling": "gem", "head_bn": True},
}
FILES = ["model.json", "model.onnx", "model.safetensors", "model.ts"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """Pretrained EfficientNet-Lite0, a GeM head and a BatchNorm with non-trivial statistics."""
    torch.manual_seed(0)
    model = Embedder(
        create_backbone("tf_efficientnet_lite0", pretrained=True), **CONFIG["embedder"]
    )
    norm = model.head[1]
    norm.running_mean.uniform_(-0.05, 0.05)  # type: ignore[operator]
    norm.running_var.uniform_(0.5, 2.0)  # type: ignore[operator]
    return model.eval()


@pytest.fixture(scope="module")
def bundle(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundle")
    assert export_model(embedder, folder, CONFIG, SIZE) == {
        "model_config": "model.json",
        "weights": "model.safetensors",
        "torchscript": "model.ts",
        "onnx": "model.onnx",
    }
    return folder


@pytest.fixture(scope="module")
def images(embedder: Embedder) -> np.ndarray:
    """7 demo images prepared as the bundle would: (7, 3, 64, 64) float32."""
    pre = embedder.preprocessing.with_size(SIZE)
    return pre.batch([render_demo_image(0, label, 0, image_size=96) for label in range(7)])


def _reference(embedder: Embedder, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return embedder(torch.from_numpy(batch)).numpy()


def test_export_writes_the_model_files_and_a_complete_model_json(bundle: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == FILES  # no temporary files left
    assert json.loads((bundle / "model.json").read_text()) == {
        **CONFIG,
        "input_size": SIZE,
        "output_dim": 128,
    }
    assert read_model_config(bundle / "model.json")["output_dim"] == 128


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_raw_files_take_any_batch_and_return_unit_rows(bundle: Path, images: np.ndarray) -> None:
    """The files alone (no Runtime) honour the contract: dynamic batch, L2-normalised rows."""
    import onnx
    import onnxruntime

    model = onnx.load(str(bundle / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    [image_input], [output] = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in image_input.type.tensor_type.shape.dim]
    assert (image_input.name, dims, output.name) == (
        "images",
        ["batch", 3, SIZE, SIZE],
        "embeddings",
    )
    session = onnxruntime.InferenceSession(
        str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    scripted = torch.jit.load(str(bundle / "model.ts"))
    for batch in (images[:1], images[:5]):
        raw_onnx = session.run(["embeddings"], {"images": batch})[0]
        with torch.no_grad():
            raw_ts = scripted(torch.from_numpy(batch)).numpy()
        for raw in (raw_onnx, raw_ts):
            assert raw.shape == (len(batch), 128) and raw.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["onnx", OPENVINO, "torchscript", "eager"])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_runtime_matches_pytorch(
    bundle: Path, embedder: Embedder, images: np.ndarray, kind: str, batch_size: int
) -> None:
    runtime = load_runtime(bundle, kind, threads=2, device="cpu")
    assert (runtime.kind, runtime.device, runtime.embedding_dim, runtime.input_size) == (
        kind,
        "cpu",
        128,
        SIZE,
    )
    batch = images[:batch_size]
    got, expected = runtime.embed(batch), _reference(embedder, batch)
    assert got.shape == (batch_size, 128) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert (got * expected).sum(axis=1).min() >= 0.9999
    assert np.abs(got - expected).max() < 1e-4


def test_openvino_without_the_package_says_how_to_install_it(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ValueError, match=r"kind='openvino' needs OpenVINO: pip install openvino"):
        load_runtime(bundle, "openvino")


@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_serves_concurrent_callers_each_with_its_own_request(
    bundle: Path, embedder: Embedder, images: np.ndarray, threads: int
) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed (the 'openvino' extra)")
    from concurrent.futures import ThreadPoolExecutor

    runtime = load_runtime(bundle, "openvino", threads=threads)
    batches = [images[i % len(images) : i % len(images) + 1 + i % 3] for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(runtime.embed, batches))
    for batch, got in zip(batches, results, strict=True):
        assert (got * _reference(embedder, batch)).sum(axis=1).min() >= 0.9999


def test_auto_prefers_onnx_and_embed_checks_its_input(bundle: Path, images: np.ndarray) -> None:
    runtime = load_runtime(bundle)
    assert isinstance(runtime, Runtime) and runtime.kind == "onnx"
    assert runtime.embed(images[:0]).shape == (0, 128)
    with pytest.raises(TypeError, match=r"float32 images, got float64: use \.astype"):
        runtime.embed(images.astype(np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        runtime.embed(images.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(B, 3, 64, 64\), got \(7, 3, 32, 32\)"):
        runtime.embed(np.ascontiguousarray(images[:, :, :32, :32]))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\)"):
        runtime.embed(images[0])
    with pytest.raises(ValueError, match="kind must be one of"):
        load_runtime(bundle, "tensorrt")
    with pytest.raises(ValueError, match="threads"):
        load_runtime(bundle, "onnx", threads=0)


def test_build_embedder_round_trip_is_identical(
    bundle: Path, embedder: Embedder, images: np.ndarray
) -> None:
    rebuilt = build_embedder(
        json.loads((bundle / "model.json").read_text()), bundle / "model.safetensors"
    )
    assert not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(torch.from_numpy(images)), embedder(torch.from_numpy(images)))


def test_export_leaves_the_caller_model_alone_torchvision_no_head(tmp_path: Path) -> None:
    model = Embedder(
        create_backbone("resnet18", pretrained=False, source="torchvision"), None, "avg"
    )
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {
        "backbone": {"name": "resnet18", "source": "torchvision"},
        "embedder": {"embedding_dim": None, "pooling": "avg"},
    }
    export_model(model, tmp_path, config, 32)
    assert model.training and model.channels_last
    conv = model.backbone.net[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    written = read_model_config(tmp_path / "model.json")
    assert written["backbone"]["kwargs"] == {} and written["embedder"]["head_bn"] is False
    assert written["output_dim"] == 512
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = _reference(model.eval(), batch)
    for kind in ("eager", "onnx"):
        got = load_runtime(tmp_path, kind, device="cpu").embed(batch)
        assert (got * expected).sum(axis=1).min() >= 0.9999


def test_export_refuses_a_config_that_does_not_rebuild_the_model(tmp_path: Path) -> None:
    model = Embedder(create_backbone("resnet18", pretrained=False), 16, "avg").eval()
    base = {"backbone": {"name": "resnet18"}, "embedder": {"embedding_dim": 16, "pooling": "avg"}}
    wrong_pooling = {**base, "embedder": {"embedding_dim": 16, "pooling": "max"}}
    with pytest.raises(BundleError, match="weights with model.json disagrees"):
        export_model(model, tmp_path, wrong_pooling, 64)
    wrong_head = {**base, "embedder": {"embedding_dim": 16, "pooling": "avg", "head_bn": True}}
    with pytest.raises(BundleError, match=r"missing keys \['head\.1\.weight'"):
        export_model(model, tmp_path, wrong_head, 64)
    with pytest.raises(BundleError, match="'output_dim' is 32, the export 16"):
        export_model(model, tmp_path, {**base, "output_dim": 32}, 64)
    with pytest.raises(BundleError, match="does not exist"):
        export_model(model, tmp_path / "nowhere", base, 64)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing left behind


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, r"unknown fields \['extra'\] in 'model config'"),
        ({"backbone": None}, r"'backbone' must be a JSON object, got None"),
        ({"embedder": "gem"}, r"'embedder' must be a JSON object"),
        ({"backbone": {"source": "timm"}}, r"'backbone.name' must be a backbone name, got nothing"),
        (
            {"backbone": {"name": "x", "source": "keras"}},
            r"'backbone.source' must be 'timm', 'torchvision' or",
        ),
        ({"backbone": {"name": "x", "kwargs": [1]}}, r"'backbone.kwargs' must be a JSON object"),
        (
            {"backbone": {"name": "x", "weights": "a.pt"}},
            r"unknown fields \['weights'\] in 'backbone'",
        ),
        (
            {"embedder": {"embedding_dim": -1, "pooling": "gem"}},
            r"'embedder.embedding_dim' must be",
        ),
        ({"embedder": {"embedding_dim": "128", "pooling": "gem"}}, r"'embedder.embedding_dim'"),
        (
            {"embedder": {"embedding_dim": 8, "pooling": "median"}},
            r"'embedder.pooling' must be one of",
        ),
        ({"embedder": {"embedding_dim": 8}}, r"'embedder.pooling' must be .* got nothing"),
        (
            {"embedder": {"embedding_dim": 8, "pooling": "gem", "head_bn": "yes"}},
            r"'embedder.head_bn'",
        ),
        ({"input_size": 0}, r"field 'input_size' must be a positive integer, got 0"),
        ({"output_dim": True}, r"field 'output_dim' must be a positive integer, got True"),
    ],
)
def test_model_config_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        check_model_config({**CONFIG, **change}, complete=False)


def test_bad_backbone_kwargs_are_named(bundle: Path) -> None:
    # an allowed keyword (see BACKBONE_KWARGS) that this backbone's constructor refuses
    config = {**CONFIG, "backbone": {"name": "tf_efficientnet_lite0", "kwargs": {"img_size": 64}}}
    with pytest.raises(BundleError, match=r"does not take backbone.kwargs \{'img_size': 64\}"):
        build_embedder(config, bundle / "model.safetensors")
    config["backbone"]["kwargs"] = {"bogus": 1}  # any other keyword is refused before building
    with pytest.raises(BundleError, match=r"'backbone.kwargs' may not hold 'bogus'"):
        build_embedder(config, bundle / "model.safetensors")


def test_read_model_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text("{not json")
    with pytest.raises(BundleError, match=f"{path} is not valid JSON"):
        read_model_config(path)
    path.write_text(json.dumps(CONFIG))  # input_size and output_dim are required in a file
    with pytest.raises(BundleError, match=f"{path}: field 'input_size' must be"):
        read_model_config(path)
    with pytest.raises(BundleError, match="does not exist"):
        read_model_config(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("head.0.weight"), r"missing keys \['head\.0\.weight'\] \(1\)"),
        (lambda s: s.update(extra=torch.zeros(1)), r"unexpected keys \['extra'\] \(1\)"),
        (lambda s: s.update({"head.0.bias": torch.zeros(3)}), r"wrong shapes \['head\.0\.bias'\]"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_weights_that_do_not_fit_are_named(
    bundle: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    state = load_file(str(bundle / "model.safetensors"))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    with pytest.raises(BundleError, match=f"{path} does not fit the model.*{message}"):
        build_embedder(CONFIG, path)


@pytest.mark.parametrize(
    ("kind", "name"),
    [("onnx", "model.onnx"), ("torchscript", "model.ts"), ("eager", "model.safetensors")],
)
def test_truncated_or_missing_files_are_named(
    bundle: Path, tmp_path: Path, kind: str, name: str
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=f"{copy / name} .*(corrupt or truncated|not a readable)"):
        load_runtime(copy, kind, device="cpu")
    (copy / name).unlink()
    with pytest.raises(BundleError, match=f"{copy / name} does not exist"):
        load_runtime(copy, kind, device="cpu")


def test_importing_the_model_module_pulls_no_training_stack() -> None:
    code = (
        "import retrieval.bundle.runtime, retrieval.bundle.model_export, sys; "
        "banned = {'hydra', 'omegaconf', 'lightning'}; "
        "assert not any(m.split('.')[0] in banned for m in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_dynamo_exporter_matches_pytorch(
    embedder: Embedder, images: np.ndarray, tmp_path: Path
) -> None:
    export_model(embedder, tmp_path, CONFIG, SIZE, onnx_exporter="dynamo")
    runtime = load_runtime(tmp_path, "onnx", device="cpu")
    for batch in (images[:1], images):
        got, expected = runtime.embed(batch), _reference(embedder, batch)
        assert (got * expected).sum(axis=1).min() >= 0.9999


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["torchscript", "eager"])
def test_cuda_runtime_matches_cpu(
    bundle: Path, embedder: Embedder, images: np.ndarray, kind: str
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    runtime = load_runtime(bundle, kind, device="cuda")
    assert runtime.device == "cuda"
    got, expected = runtime.embed(images), _reference(embedder, images)
    assert (got * expected).sum(axis=1).min() >= 0.999  # TF32 convolutions on recent GPUs

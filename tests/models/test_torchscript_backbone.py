"""TorchScript backbones (backbone=sscd_resnet50 loads Meta's file this way): a small model
the test writes stands in for SSCD; anything that is not a TorchScript archive is refused
before torch opens it, and so is a model of the wrong width."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retrieval.bundle.model_export import export_model
from retrieval.bundle.runtime import load_runtime
from retrieval.models import Embedder, create_backbone
from retrieval.models.torchscript import TorchScriptError, check_archive, load_torchscript
from tests.conftest import CONF


class TinyDescriptor(nn.Module):
    """Images -> 512-d descriptors, as SSCD's TorchScript file maps them."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _script(path: Path, dim: int = 512) -> Path:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        torch.jit.save(torch.jit.script(TinyDescriptor(dim).eval()), str(path))
    return path


def _sscd_kwargs() -> dict:
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(CONF / "backbone" / "sscd_resnet50.yaml"))
    assert isinstance(node, dict)
    node.pop("_target_")
    return node


def test_the_sscd_config_loads_a_torchscript_file_with_its_own_preprocessing(tmp_path) -> None:
    kwargs = {**_sscd_kwargs(), "weights": str(_script(tmp_path / "sscd.pt"))}
    backbone = create_backbone(**kwargs)
    assert backbone.pooled and backbone.num_features == 512
    pre = backbone.preprocessing
    assert (pre.input_size, pre.resize_mode) == (288, "short")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    embedder = Embedder(backbone, None, "gem").eval()  # pooling does not apply
    images = torch.randn(2, 3, 288, 384)
    with torch.no_grad():
        out = embedder(images)
        raw = backbone.net(images)
    assert out.shape == (2, 512)
    np.testing.assert_allclose(out.numpy(), nn.functional.normalize(raw).numpy(), atol=1e-6)


def test_a_torchscript_backbone_exports_and_runs_as_onnx_and_torchscript(tmp_path) -> None:
    backbone = create_backbone(**{**_sscd_kwargs(), "weights": str(_script(tmp_path / "s.pt"))})
    embedder = Embedder(backbone, None, "avg").eval()
    config = {
        "backbone": {"name": "sscd_disc_mixup", "source": "torchscript", "kwargs": {}},
        "embedder": {"embedding_dim": None, "pooling": "avg", "head_bn": False},
    }
    folder = tmp_path / "model"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(embedder, folder, config, 64, any_size=True)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = embedder(images).numpy()
    for kind in ("onnx", "torchscript"):
        got = load_runtime(folder, kind, device="cpu").embed(images.numpy())
        assert (got * expected).sum(axis=1).min() > 0.9999, kind
    with pytest.raises(ValueError, match="does not rebuild"):
        load_runtime(folder, "eager", device="cpu")


def test_a_torch_save_pickle_is_refused_before_torch_opens_it(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save(TinyDescriptor().state_dict(), path)  # a zip with data.pkl but no code/
    with pytest.raises(TorchScriptError, match="not a TorchScript archive"):
        load_torchscript(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(TorchScriptError, match="not a complete zip"):
        check_archive(plain)


def test_truncated_or_foreign_archives_and_wrong_widths_are_named(tmp_path) -> None:
    good = _script(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TorchScriptError, match="truncated.pt"):
        load_torchscript(truncated)
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("x/readme.txt", "hello")
    with pytest.raises(TorchScriptError, match="foreign.zip is not a TorchScript archive"):
        load_torchscript(foreign)
    narrow = _script(tmp_path / "narrow.pt", dim=16)
    with pytest.raises(TorchScriptError, match="gives 16-d vectors, not the 512-d"):
        load_torchscript(narrow, expected_dim=512)
    with pytest.raises(TorchScriptError, match="no such file"):
        load_torchscript(tmp_path / "missing.pt")
    with pytest.raises(TorchScriptError, match="backbone.weights=PATH"):
        create_backbone("x", source="torchscript")


def test_without_the_network_the_download_says_what_to_do(tmp_path, monkeypatch) -> None:
    from retrieval.models import torchscript

    monkeypatch.setattr(torchscript, "CACHE", tmp_path)
    monkeypatch.setattr(torchscript.io, "network_reachable", lambda host="": False)
    with pytest.raises(TorchScriptError, match="network is unreachable.*backbone.weights=PATH"):
        create_backbone(**_sscd_kwargs())

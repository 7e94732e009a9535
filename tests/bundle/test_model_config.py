"""``model.json`` has one author, :func:`model_config_for`: the fields it writes for a tiny
model, from the arguments the model was built with, its search-time layers and the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retrieval.bundle.format import BundleError
from retrieval.bundle.model_config import (
    model_architecture,
    model_config_for,
    model_config_text,
)
from retrieval.bundle.model_export import export_model
from retrieval.models import Embedder, create_backbone
from retrieval.postprocess import TTA, fit_whitening

# what a task's config resolves to (conf/model, conf/backbone), Hydra's _target_ keys dropped
ARGUMENTS: dict[str, Any] = {
    "backbone": {"name": "resnet18", "pretrained": False, "weights": None, "drop_rate": 0.1},
    "embedding_dim": 16,
    "pooling": "gem",
    "freeze_bn": True,
    "frozen_stages": 0,
}
# model.json of that model with TTA and a whitening to 8 dimensions, exported at 32 px
WRITTEN = {
    "backbone": {"name": "resnet18", "source": "timm", "kwargs": {"drop_rate": 0.1}},
    "embedder": {
        "embedding_dim": 16,
        "pooling": "gem",
        "head_bn": False,
        "tta": {"scales": [1.0, 0.5], "flip": True},
        "whiten_dim": 8,
    },
    "input_size": 32,
    "output_dim": 8,
}


def _built(arguments: dict[str, Any]) -> Embedder:
    """The Embedder ``arguments`` describe, in eval mode."""
    torch.manual_seed(0)
    others = {k: v for k, v in arguments.items() if k != "backbone"}
    return Embedder(create_backbone(**arguments["backbone"]), **others).eval()


@pytest.fixture(scope="module")
def stepped() -> Embedder:
    """The model of ``ARGUMENTS`` with TTA and a whitening, as export.py exports it."""
    model = _built(ARGUMENTS)
    vectors = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    return model.with_search_steps(TTA(scales=(1.0, 0.5), flip=True), fit_whitening(vectors, 8))


def test_the_architecture_leaves_out_weights_and_training_settings():
    assert model_architecture(ARGUMENTS) == {
        "backbone": {"name": "resnet18", "source": "timm", "kwargs": {"drop_rate": 0.1}},
        "embedder": {"embedding_dim": 16, "pooling": "gem"},
    }
    script = {"backbone": {"name": "sscd", "source": "torchscript", "path": "/x.pt"}}
    assert model_architecture({**script, "embedding_dim": None, "pooling": "avg"})["backbone"] == {
        "name": "sscd",
        "source": "torchscript",
        "kwargs": {},
    }


def test_model_json_holds_the_architecture_search_steps_and_export(stepped, tmp_path: Path):
    config = model_config_for(stepped, model_architecture(ARGUMENTS), 32)
    assert config == WRITTEN
    assert list(config) == ["backbone", "embedder", "input_size", "output_dim"]
    assert list(config["embedder"]) == ["embedding_dim", "pooling", "head_bn", "tta", "whiten_dim"]
    export_model(stepped, tmp_path, model_architecture(ARGUMENTS), 32)
    text = (tmp_path / "model.json").read_text(encoding="utf-8")
    assert text == model_config_text(WRITTEN) == json.dumps(WRITTEN, indent=2) + "\n"


def test_any_size_is_written_only_when_true(stepped):
    architecture = model_architecture(ARGUMENTS)
    assert model_config_for(stepped, architecture, 32, any_size=True)["any_size"] is True
    assert "any_size" not in model_config_for(stepped, architecture, 32)


def test_fields_the_caller_states_must_agree_with_the_export(stepped):
    architecture = model_architecture(ARGUMENTS)
    stated = {**architecture, "embedder": {**architecture["embedder"], "tta": None}}
    assert model_config_for(stepped, stated, 32) == WRITTEN  # a null layer is filled in
    with pytest.raises(BundleError, match="'embedder.whiten_dim' is 4, the export 8"):
        wrong = {**architecture, "embedder": {**architecture["embedder"], "whiten_dim": 4}}
        model_config_for(stepped, wrong, 32)
    with pytest.raises(BundleError, match="'input_size' is 64, the export 32"):
        model_config_for(stepped, {**architecture, "input_size": 64}, 32)
    plain = _built(ARGUMENTS)
    with pytest.raises(BundleError, match=r"'embedder.tta' is \{.*\}, the export None"):
        model_config_for(plain, {**architecture, "embedder": WRITTEN["embedder"]}, 32)

"""Saved configs name functions by the module paths they had when saved: a checkpoint or run
folder written before a recipe moved (``retrieval.data.demo`` -> ``retrieval.datasets.demo``)
still loads, its ``_target_``s read as where the functions are now."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from retrieval.datasets import converters, copydetect, demo, emoji
from retrieval.tasks.config import CONF_DIR, MOVED_TARGETS, current_targets
from retrieval.tasks.models import data_config, load_model
from retrieval.tasks.resume import plan_resume
from tests.conftest import compose_train

DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def _old(target: str) -> str:
    """``target`` under the path it had before its module moved (itself if it never moved)."""
    for old, new in MOVED_TARGETS.items():
        if target.startswith(new):
            return old + target[len(new) :]
    return target


def test_every_moved_module_is_where_the_mapping_says():
    for old, new in MOVED_TARGETS.items():
        assert old.endswith(".") and new.endswith(".")
        assert importlib.util.find_spec(old.rstrip(".")) is None  # gone from its old path
        assert importlib.import_module(new.rstrip("."))


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_an_old_data_target_instantiates_to_the_moved_function(name):
    manifest = OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml").get("manifest")
    target = manifest.get("_target_") if OmegaConf.is_dict(manifest) else None
    if target is None:
        pytest.skip(f"conf/data/{name}.yaml names no recipe (a manifest file is given)")
    saved = {"data": {"manifest": {"_target_": _old(target), "_partial_": True}}}
    read = current_targets(saved)
    assert read["data"]["manifest"]["_target_"] == target
    assert instantiate(OmegaConf.create(read["data"]["manifest"])).func is get_method(target)


def test_the_old_recipe_paths_name_the_present_functions():
    read = current_targets(
        {
            "a": {"_target_": "retrieval.data.demo.prepare_demo"},
            "b": [{"_target_": "retrieval.data.emoji.prepare_emoji"}],
            "c": {"_target_": "retrieval.data.copydetect.prepare_copydetect"},
            "d": {"_target_": "retrieval.data.converters.cub200", "root": "retrieval.data.demo."},
            "e": {"_target_": "retrieval.data.datamodule.RetrievalDataModule"},
        }
    )
    assert get_method(read["a"]["_target_"]) is demo.prepare_demo
    assert get_method(read["b"][0]["_target_"]) is emoji.prepare_emoji
    assert get_method(read["c"]["_target_"]) is copydetect.prepare_copydetect
    assert get_method(read["d"]["_target_"]) is converters.cub200
    assert read["d"]["root"] == "retrieval.data.demo."  # only _target_ values are read anew
    assert read["e"]["_target_"] == "retrieval.data.datamodule.RetrievalDataModule"


def test_a_checkpoint_saved_with_old_targets_loads(tmp_path: Path):
    """A checkpoint as train.py writes it, its run config naming the recipe's old path."""
    cfg = compose_train(["backbone=resnet18", "backbone.pretrained=false"], tmp_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(run_config, dict)
    run_config["data"]["manifest"]["_target_"] = "retrieval.data.demo.prepare_demo"
    embedder = instantiate(cfg.model.embedder)
    state = {f"model.{k}": v for k, v in embedder.state_dict().items()}
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "run_config": run_config, "epoch": 3}, ckpt)

    loaded = load_model(OmegaConf.create({"ckpt_path": str(ckpt)}))
    data = data_config(OmegaConf.create({}), loaded.checkpoint)
    assert data.manifest._target_ == "retrieval.datasets.demo.prepare_demo"
    manifest = instantiate(data.manifest, _partial_=True)
    assert manifest.func is demo.prepare_demo


def test_resuming_a_run_saved_with_old_targets_changes_nothing(tmp_path: Path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    overrides = ["debug=fast", "data=copydetect"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    saved = OmegaConf.to_container(compose_train(overrides, tmp_path), resolve=True)
    assert isinstance(saved, dict)
    saved["data"]["manifest"]["_target_"] = "retrieval.data.copydetect.prepare_copydetect"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    ckpt = str(run / "checkpoints" / "last.ckpt")

    plan = plan_resume(ckpt, [f"ckpt_path={ckpt}"], lambda o: compose_train(o, tmp_path))
    assert plan.changed == {} and plan.carry_best

"""Shared fixtures: composing the training config as `python train.py` would."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The config `python train.py OVERRIDES` would run, with data and output under tmp_path."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.data_dir={tmp_path}/data",
                f"paths.output_dir={tmp_path}/out",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset (20 labels x 12 images, 64 px), generated once per test session."""
    from retrieval.data.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo")
    return prepare_demo(root / "demo", num_labels=20, images_per_label=12, image_size=64)

"""Shared fixtures: composing the training config as `python train.py` would."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from retrieval.tasks.config import CONF_DIR, compose_config

CONF = CONF_DIR

# A real small bundle and its gallery, shared by the bundle and service tests; the Milvus
# server the backend and service tests run on beside Milvus Lite.
pytest_plugins = ["tests.bundle_fixtures", "tests.milvus_engines"]


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The config `python train.py OVERRIDES` would run, with data and output under tmp_path."""
    return compose_config(
        [f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out", *overrides]
    )


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of the demo dataset (60 labels x 12 images, 128 px), generated once per session."""
    from retrieval.datasets.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo")
    return prepare_demo(root / "demo", num_labels=60, images_per_label=12, image_size=128)

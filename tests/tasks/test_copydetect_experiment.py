"""experiment=copydetect composes and builds instance training on a folder of photos."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image
from pytorch_metric_learning.losses import NTXentLoss

from retrieval.data.copy_edits import CopyEditAugment
from retrieval.data.sampler import InstanceBatchSampler
from tests.conftest import CONF, compose_train

pytestmark = pytest.mark.skipif(
    not (CONF / "data" / "copydetect.yaml").is_file(),
    reason="conf/data/copydetect.yaml (the copy-detection data config) is not in this checkout",
)


def _photos(folder, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:03d}.png")


def test_copydetect_experiment_composes_to_instance_training(tmp_path):
    cfg = compose_train(["experiment=copydetect", f"data.root={tmp_path}/photos"], tmp_path)
    assert cfg.data.augment == "copydetect" and cfg.data.root == f"{tmp_path}/photos"
    assert cfg.miner is None
    assert cfg.model.embedder.pooling == "gem" and cfg.model.embedder.embedding_dim == 512
    sampler = instantiate(cfg.sampler)(labels=range(80), seed=0, num_replicas=1, rank=0)
    assert isinstance(sampler, InstanceBatchSampler) and (sampler.p, sampler.k) == (64, 2)
    assert cfg.data.anchor_view is True and cfg.model.embedder.frozen_stages == 4
    # training views at 160 px, validation and export at the backbone's own size
    assert cfg.data.train_image_size == 160 and cfg.data.image_size is None
    loss = instantiate(cfg.loss)
    assert isinstance(loss, NTXentLoss) and loss.temperature == pytest.approx(0.1)
    # an experiment's top-level keys win over train.yaml's own defaults
    assert cfg.baseline_untrained is False and cfg.baseline_pretrained is False
    assert cfg.data.resize_mode == "squash"


def tiny_copydetect(tmp_path, *extra: str) -> dict:
    """``build`` of experiment=copydetect on 44 generated photos, trained at 24 px and
    validated at 32, batches of 8 images."""
    from retrieval.tasks.train import build

    _photos(tmp_path / "photos", 44)
    overrides = [
        "experiment=copydetect",
        f"data.root={tmp_path}/photos",
        "data.image_size=32",
        "data.train_image_size=24",
        "data.num_workers=0",
        "sampler.images_per_batch=8",
        "logger=csv",
        "trainer=cpu",
        *extra,
    ]
    return build(compose_train(overrides, tmp_path))


def test_copydetect_experiment_builds_and_loads_instance_batches(tmp_path):
    objects = tiny_copydetect(tmp_path)
    datamodule = objects["datamodule"]
    anchor, edited = datamodule.train_set.view_transforms  # a plain view, an edited one
    assert not any(isinstance(step, CopyEditAugment) for step in anchor.transforms)
    assert any(isinstance(step, CopyEditAugment) for step in edited.transforms)
    assert datamodule.num_train_labels == len(datamodule.train_set)  # every image its own label
    random.seed(0)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (16, 3, 24, 24)
    assert batch["label"][::2].tolist() == batch["label"][1::2].tolist()
    assert len(set(batch["label"].tolist())) == 8
    assert next(iter(datamodule.val_dataloader()))["image"].shape[1:] == (3, 32, 32)


def test_copydetect_experiment_with_too_few_images_names_the_fix(tmp_path):
    from retrieval.tasks.train import build

    _photos(tmp_path / "photos", 22)  # 20 training images after the held-out originals
    overrides = ["experiment=copydetect", f"data.root={tmp_path}/photos", "logger=csv"]
    with pytest.raises(ValueError, match="sampler.images_per_batch=64 .* has 20"):
        build(compose_train([*overrides, "data.num_workers=0"], tmp_path))

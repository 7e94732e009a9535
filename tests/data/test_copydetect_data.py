"""The copydetect train transform and instance batches through the data module."""

import csv
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from retrieval.data.copy_edits import CopyEditAugment
from retrieval.data.datamodule import RetrievalDataModule
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.sampler import InstanceBatchSampler
from retrieval.data.transforms import train_transform

PRE = Preprocessing(input_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _photo(seed: int, size: tuple[int, int] = (70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


def test_copydetect_gives_normalised_tensors_of_the_input_size_deterministically():
    transform, image = train_transform(PRE, augment="copydetect"), _photo(0)
    outputs = [_seeded(transform, image, seed) for seed in (1, 1, 2)]
    assert all(o.shape == (3, 40, 40) and o.dtype == torch.float32 for o in outputs)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def _kinds(steps) -> list[type]:
    return [type(step) for step in steps]


def test_copydetect_edits_the_picture_before_the_crop():
    steps = train_transform(PRE, augment="copydetect").transforms
    kinds = _kinds(steps)
    edit, crop = kinds.index(CopyEditAugment), kinds.index(T.RandomResizedCrop)
    assert edit < crop < kinds.index(T.RandomHorizontalFlip)
    assert steps[edit].overlays == [] and steps[crop].scale == (0.3, 1.0)


def test_copydetect_edits_change_the_views():
    """With the crop and the flip fixed, the copy edits alone make two views differ."""
    transform, image = train_transform(PRE, augment="copydetect", hflip=False), _photo(0)
    random.seed(3)  # two calls that both draw edits
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert not torch.equal(first, transform(image))


def test_standard_is_unchanged_by_default():
    steps = train_transform(PRE).transforms
    assert _kinds(steps) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert steps[0].scale == (0.25, 1.0)
    custom = train_transform(PRE, scale=(0.5, 1.0), augment="copydetect").transforms
    assert custom[_kinds(custom).index(T.RandomResizedCrop)].scale == (0.5, 1.0)


def test_overlay_dir_is_loaded_for_the_emoji_edit(tmp_path):
    for i in range(3):
        Image.new("RGBA", (16, 16), (255, i, 0, 200)).save(tmp_path / f"e{i}.png")
    steps = train_transform(PRE, augment="copydetect", overlay_dir=tmp_path).transforms
    augment = steps[_kinds(steps).index(CopyEditAugment)]
    assert len(augment.overlays) == 3 and augment.overlays[0].mode == "RGBA"


def test_bad_augment_choices_fail():
    with pytest.raises(ValueError, match="augment='sscd' is not one of standard, copydetect"):
        train_transform(PRE, augment="sscd")
    with pytest.raises(ValueError, match="only by augment=copydetect"):
        train_transform(PRE, overlay_dir="/emoji")
    with pytest.raises(ValueError, match="holds no images|is not a folder"):
        train_transform(PRE, augment="copydetect", overlay_dir="/no/such/emoji")


def _instance_manifest(tmp_path: Path, train: int, test: int = 4) -> Path:
    """Every training image its own label, as the copy-detection converter writes them; test
    images in pairs of one label (a validation split with something to find)."""
    rows = []
    for i in range(train + test):
        path = tmp_path / f"img{i}.png"
        _photo(i).save(path)
        label = f"id{i}" if i < train else f"pair{(i - train) // 2}"
        rows.append([str(path), label, "train" if i < train else "test"])
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    return manifest


def _datamodule(manifest: Path, images_per_batch: int) -> RetrievalDataModule:
    sampler = partial(InstanceBatchSampler, images_per_batch=images_per_batch, views_per_image=2)
    return RetrievalDataModule(
        manifest, PRE, sampler, image_size=32, num_workers=0, augment="copydetect"
    )


def test_datamodule_gives_instance_batches_of_augmented_views(tmp_path):
    dm = _datamodule(_instance_manifest(tmp_path, train=12), images_per_batch=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 3
    random.seed(0)
    torch.manual_seed(0)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 3, 32, 32)
    labels = batch["label"].tolist()
    assert labels[::2] == labels[1::2] and len(set(labels)) == 4
    assert batch["index"][::2].tolist() == batch["index"][1::2].tolist()
    for a, b in zip(batch["image"][::2], batch["image"][1::2], strict=True):
        assert not torch.equal(a, b)  # two views of one image


def test_datamodule_fails_before_training_with_fewer_images_than_p(tmp_path):
    dm = _datamodule(_instance_manifest(tmp_path, train=6), images_per_batch=8)
    with pytest.raises(ValueError, match=r"sampler.images_per_batch=8 .* has 6"):
        dm.setup("fit")

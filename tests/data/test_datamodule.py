import csv
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.data.datamodule import RetrievalDataModule
from retrieval.data.images import ImageLoadError
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.sampler import PKBatchSampler
from retrieval.evaluation import evaluate_protocol

PRE = Preprocessing(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def datamodule(manifest: Path, **kwargs) -> RetrievalDataModule:
    sampler = partial(PKBatchSampler, labels_per_batch=4, samples_per_label=3)
    return RetrievalDataModule(manifest, PRE, sampler, image_size=48, num_workers=0, **kwargs)


def with_bad_files(small_demo: Path, tmp_path: Path) -> Path:
    """A copy of the demo manifest with a zero-byte, a truncated and a non-image train file."""
    root = small_demo.parent
    with small_demo.open() as f:
        rows = [[str(root / r["path"]), r["label"], r["split"]] for r in csv.DictReader(f)]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = Path(rows[0][0]).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    bad = [[str(tmp_path / n), rows[0][1], "train"] for n in ("empty.jpg", "text.jpg", "cut.jpg")]
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows + bad)
    return path


def test_unreadable_images_are_skipped_with_one_warning_or_fatal_when_strict(small_demo, tmp_path):
    manifest = with_bad_files(small_demo, tmp_path)
    dm = datamodule(manifest)
    with pytest.warns(UserWarning, match=r"skipping 3 of \d+ images .*empty\.jpg") as record:
        dm.setup()
    assert len([w for w in record if "skipping" in str(w.message)]) == 1
    assert not any("jpg" in str(r.path) and r.path.parent == tmp_path for r in dm.train_set.rows)
    with pytest.raises(ImageLoadError, match="3 of .* cannot be read"):
        datamodule(manifest, strict_images=True).setup()


def test_loaders_give_pk_batches_and_eval_tensors(small_demo):
    dm = datamodule(small_demo, max_labels=6)
    dm.setup()
    assert dm.num_train_labels == 6 and len(dm.val_set.label_names) == 6
    assert set(dm.train_set.label_names).isdisjoint(dm.val_set.label_names)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (12, 3, 48, 48)
    assert sorted(torch.bincount(batch["label"]).tolist())[-4:] == [3, 3, 3, 3]
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[1:] == (3, 48, 48) and bool(val["is_query"].all())
    # eval images are normalised with the backbone's mean/std, not ImageNet's
    assert val["image"].min() >= (0 - 0.5) / 0.25 - 1e-4


def test_query_gallery_flags_select_the_protocol():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    flags = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    split, q_rows, g_rows = evaluate_protocol(x, labels, flags, 1 - flags, ks=(1,))
    assert split.num_queries == 4  # In-Shop: 4 queries against 4 gallery images
    assert q_rows.tolist() == [0, 1, 2, 3] and g_rows.tolist() == [4, 5, 6, 7]
    loo, q_rows, g_rows = evaluate_protocol(x, labels, np.ones(8), np.ones(8), ks=(1,))
    assert loo.num_queries == 8 and q_rows.tolist() == g_rows.tolist() == list(range(8))
    with pytest.raises(ValueError, match="both query and gallery"):
        evaluate_protocol(x, labels, np.ones(8), flags, ks=(1,))


def test_validation_is_sharded_across_ranks_with_equal_shapes(small_demo):
    """Under W processes each rank loads 1/W of the evaluation split (DistributedSampler,
    shuffle off): the same number of batches of the same sizes on every rank, the last one
    partial, padding that repeats the split's first items, and every item on some rank."""
    from types import SimpleNamespace

    dm = datamodule(small_demo, max_labels=3, eval_batch_size=3)  # 36 test images
    n = len(dm.eval_set())
    assert n == 36
    # 5 ranks: 36 = 5 x 8 - 4, so 4 repeats and 8 items a rank, in batches of 3, 3 and 2
    for world, expected in ((1, [3] * 12), (5, [3, 3, 2])):
        shards = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # type: ignore[assignment]
            loader = dm.val_dataloader()
            shards.append([b["index"].tolist() for b in loader])
        dm.trainer = None
        sizes = [[len(b) for b in shard] for shard in shards]
        assert sizes == [expected] * world
        flat = [i for shard in shards for b in shard for i in b]
        assert sorted(set(flat)) == list(range(n))
        repeated = sorted(i for i, c in Counter(flat).items() if c > 1)
        assert repeated == list(range(sum(expected) * world - n))  # the split's first items
        if world > 1:
            assert shards[0][0][:2] == [0, world]  # rank r takes r, r + W, ...


def test_resize_mode_overrides_the_backbones_policy(small_demo, tmp_path):
    from dataclasses import replace

    from PIL import Image

    from retrieval.data.transforms import eval_transform

    assert datamodule(small_demo).preprocessing.resize_mode == "crop"  # None: PRE's own
    dm = datamodule(small_demo, max_labels=2, resize_mode="squash")
    assert dm.preprocessing == PRE.with_size(48, "squash")
    wide = tmp_path / "wide.png"
    Image.effect_mandelbrot((150, 60), (-2.0, -1.0, 1.0, 1.0), 50).convert("RGB").save(wide)
    dm.setup("validate")
    assert dm.val_set is not None
    dm.val_set.rows[0] = replace(dm.val_set.rows[0], path=wide)  # a wide image to resize
    got = dm.val_set[0]["image"]
    image = Image.open(wide).convert("RGB")
    expected = eval_transform(PRE.with_size(48, "squash"))(image)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    cropped = eval_transform(PRE.with_size(48))(image)
    assert not torch.allclose(got, cropped, atol=1e-3)
    with pytest.raises(ValueError, match=r"'resize_mode' must be one of .*got 'stretch'"):
        datamodule(small_demo, resize_mode="stretch")


def test_data_configs_pass_resize_mode_to_the_module(small_demo, tmp_path):
    from hydra.utils import instantiate

    from retrieval.tasks.config import compose_config

    cfg = compose_config(
        [
            f"paths.data_dir={tmp_path}",
            "data=manifest",
            f"data.manifest={small_demo}",
            "data.resize_mode=pad",
        ]
    )
    dm = instantiate(cfg.data, _partial_=True)(preprocessing=PRE)
    assert dm.preprocessing.resize_mode == "pad" and dm.preprocessing.input_size == 224


@pytest.mark.parametrize("anchor_view", [False, True])
def test_train_image_size_cuts_training_views_smaller_and_evaluates_at_image_size(
    small_demo, anchor_view
):
    from retrieval.data.sampler import InstanceBatchSampler

    sampler = (
        partial(InstanceBatchSampler, images_per_batch=4, views_per_image=2)
        if anchor_view
        else partial(PKBatchSampler, labels_per_batch=4, samples_per_label=2)
    )
    dm = RetrievalDataModule(
        small_demo, PRE, sampler, image_size=48, train_image_size=32, num_workers=0,
        augment="copydetect", anchor_view=anchor_view,
    )  # fmt: skip
    dm.setup()
    assert next(iter(dm.train_dataloader()))["image"].shape == (8, 3, 32, 32)
    assert next(iter(dm.val_dataloader()))["image"].shape[1:] == (3, 48, 48)
    assert dm.preprocessing.input_size == 48  # what export and evaluation take


def test_anchor_view_gives_the_first_view_plain_and_needs_instance_batches(small_demo):
    from retrieval.data.copy_edits import CopyEditAugment
    from retrieval.data.sampler import InstanceBatchSampler

    sampler = partial(InstanceBatchSampler, images_per_batch=4, views_per_image=3)
    dm = RetrievalDataModule(
        small_demo, PRE, sampler, image_size=48, num_workers=0, augment="copydetect",
        anchor_view=True, num_edits=(2, 2), edit_p=1.0,
    )  # fmt: skip
    dm.setup()
    anchor, edited = dm.train_set.view_transforms
    assert not any(isinstance(step, CopyEditAugment) for step in anchor.transforms)
    edits = [s for s in edited.transforms if isinstance(s, CopyEditAugment)]
    assert len(edits) == 1 and edits[0].num_edits == (2, 2) and edits[0].p == 1.0
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (12, 3, 48, 48)
    assert batch["label"][::3].tolist() == batch["label"][1::3].tolist()
    with pytest.raises(ValueError, match="anchor_view=true .* needs sampler=instance"):
        datamodule(small_demo, anchor_view=True).setup()

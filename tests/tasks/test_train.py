"""Training end to end on a small slice of the demo data, resume, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from retrieval.data.manifest import ManifestError
from retrieval.tasks.train import build, train
from tests.conftest import compose_train

FAST = [
    "logger=csv",
    "backbone=efficientnet_lite0",
    "data=manifest",
    "data.image_size=64",
    "data.num_workers=0",
    "data.eval_batch_size=64",
    "model.embedder.embedding_dim=64",
    "sampler.labels_per_batch=5",
    "sampler.samples_per_label=4",
]


def fast_cfg(manifest: Path, tmp_path: Path, *extra: str):
    return compose_train([*FAST, f"data.manifest={manifest}", *extra], tmp_path)


@pytest.mark.slow
def test_training_beats_the_untrained_baseline(small_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = fast_cfg(
        small_demo,
        tmp_path,
        "trainer.max_epochs=4",
        "optimizer.lr=2e-4",
        "data.image_size=128",
        "model.embedder.embedding_dim=512",
        "sampler.labels_per_batch=8",
        "logger=default",
    )
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    before, after = metrics["baseline/recall@1"], metrics["val/recall@1"]
    assert after >= before + 0.06, (before, after)
    assert metrics["val/map@r"] > metrics["baseline/map@r"]
    assert json.loads((out / "metrics.json").read_text())["val/recall@1"] == pytest.approx(after)
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert (out / "config.yaml").read_text().count("_target_") > 5
    printed = capsys.readouterr().out
    assert "val/recall@1" in printed and "untrained" in printed and str(out) in printed
    assert "W&B run saved offline in" in printed and "wandb sync" in printed
    assert list((out / "wandb").glob("offline-run-*"))
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["run_config"]["monitor"] == "val/recall@1"


@pytest.mark.slow
def test_resume_continues_at_the_same_step_and_schedule(small_demo, tmp_path):
    every_epoch = (
        "+callbacks.every_epoch={_target_: lightning.pytorch.callbacks.ModelCheckpoint,"
        f"dirpath: {tmp_path}/epochs, filename: 'e{{epoch}}', save_top_k: -1,"
        "auto_insert_metric_name: false}"
    )
    common = [
        "trainer.max_epochs=2",
        "backbone.pretrained=false",
        "data.max_labels=6",
    ]
    _, full = train(fast_cfg(small_demo, tmp_path / "a", *common, every_epoch))
    mid = tmp_path / "epochs" / "e0.ckpt"
    assert mid.is_file()
    _, resumed = train(fast_cfg(small_demo, tmp_path / "b", *common, f"ckpt_path={mid}"))

    def lr_trace(objects):
        trainer = objects["trainer"]
        return trainer.global_step, [g["lr"] for g in trainer.optimizers[0].param_groups]

    steps, lrs = lr_trace(full)
    assert steps > 0 and lr_trace(resumed) == (steps, lrs)
    per_epoch = len(full["trainer"].train_dataloader)
    assert steps == 2 * per_epoch
    assert resumed["trainer"].current_epoch == full["trainer"].current_epoch == 2


def write_manifest(path: Path, rows: list[list[str]], header=("path", "label", "split")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def demo_rows(manifest: Path) -> list[list[str]]:
    root = manifest.parent
    with manifest.open() as f:
        return [[str(root / r["path"]), r["label"], r["split"]] for r in csv.DictReader(f)]


def test_bad_input_fails_before_training(small_demo, tmp_path):
    rows = demo_rows(small_demo)
    cases = {
        "missing column": (
            write_manifest(tmp_path / "a.csv", [r[:2] for r in rows], ("path", "label")),
            [],
            ManifestError,
            "split",
        ),
        "missing files": (
            write_manifest(tmp_path / "b.csv", [[r[0] + "x", *r[1:]] for r in rows]),
            [],
            ManifestError,
            "do not exist|missing|not found",
        ),
        "empty split": (
            write_manifest(tmp_path / "c.csv", [r for r in rows if r[2] == "train"]),
            [],
            ManifestError,
            "test",
        ),
        "unfillable batch": (
            small_demo,
            ["+sampler.batch_size=30"],
            ValueError,
            "batch_size=30 cannot be filled",
        ),
        "too few labels": (
            small_demo,
            ["sampler.labels_per_batch=50"],
            ValueError,
            "labels_per_batch=50",
        ),
        "unknown backbone": (
            small_demo,
            ["backbone.name=resnet_nope"],
            ValueError,
            "unknown timm backbone 'resnet_nope'",
        ),
    }
    for name, (manifest, extra, error, match) in cases.items():
        cfg = fast_cfg(manifest, tmp_path / name.replace(" ", "_"), *extra)
        with pytest.raises(Exception) as info:
            build(cfg)
        cause = info.value
        while not isinstance(cause, error) and cause.__cause__ is not None:
            cause = cause.__cause__
        assert isinstance(cause, error), (name, info.value)
        assert __import__("re").search(match, str(cause)), (name, str(cause))


def test_only_global_rank_zero_writes_before_the_trainer_knows_its_rank(monkeypatch):
    """config.yaml and train.log are written before Lightning sets up distributed training, so
    the rank comes from what launchers set: torchrun RANK, SLURM SLURM_PROCID, Lightning
    LOCAL_RANK, LSF JSM_NAMESPACE_RANK and NODE_RANK on the other nodes of a multi-node run."""
    from retrieval.infra.progress import first_process

    names = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert first_process()
    for name in names:
        monkeypatch.setenv(name, "2")
        assert not first_process(), name
        monkeypatch.setenv(name, "0")
    assert first_process()


def test_pretrained_baseline_equals_evaluate_and_training_starts_in_train_mode(
    small_demo, tmp_path, capsys, monkeypatch
):
    """The report's pretrained column is what evaluate.py scores for the backbone as-is, and
    scoring it first leaves the module in train mode (Lightning keeps modes at fit start)."""
    from lightning.pytorch.callbacks import Callback

    import retrieval.tasks.train as train_task
    from retrieval.tasks.config import compose_config
    from retrieval.tasks.evaluate import evaluate

    modes: list[bool] = []
    norms_in_train_mode: list[int] = []

    class RecordModes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.model.backbone.training)
            norms = pl_module.model._backbone_norms()
            norms_in_train_mode.append(sum(m.training for m in norms))

    def build_recording(cfg):
        objects = build(cfg)
        objects["trainer"].callbacks.append(RecordModes())
        return objects

    monkeypatch.setattr(train_task, "build", build_recording)
    metrics, objects = train(
        fast_cfg(small_demo, tmp_path, "trainer.max_epochs=1", "data.max_labels=8")
    )
    assert modes and all(modes)
    # freeze_bn (the default) holds under Lightning's loop, which never calls train() itself
    assert norms_in_train_mode and not any(norms_in_train_mode)
    fresh = build(fast_cfg(small_demo, tmp_path / "fresh"))
    trained_norms = objects["module"].model._backbone_norms()
    fresh_norms = fresh["module"].model._backbone_norms()
    for trained_bn, fresh_bn in zip(trained_norms, fresh_norms, strict=True):
        assert torch.equal(trained_bn.running_mean, fresh_bn.running_mean)
        assert torch.equal(trained_bn.weight, fresh_bn.weight)
    printed = capsys.readouterr().out.splitlines()
    header = next(line for line in printed if "metric" in line)
    assert header.split() == ["metric", "pretrained", "untrained", "last", "epoch", "best"]
    monitored = next(line for line in printed if line.startswith("val/recall@1 "))
    best = metrics["best/val/recall@1"]
    assert monitored.split()[-1] == f"{best:.4f}"  # the best column: the monitored metric
    assert next(line for line in printed if line.startswith("val/map@r")).split()[-1] == "-"
    evaluated, _ = evaluate(
        compose_config(
            [
                f"paths.data_dir={tmp_path}/data",
                f"paths.output_dir={tmp_path}/eval",
                "logger=csv",
                "data=manifest",
                f"data.manifest={small_demo}",
                "data.image_size=64",
                "data.num_workers=0",
                "data.max_labels=8",
                "inference.use_cache=false",
                "metrics=[recall,map@r,r_precision]",
                "ks=[1,2,4,8]",
            ],
            name="evaluate",
        )
    )
    for name in ("recall@1", "recall@8", "map@r"):
        assert metrics[f"pretrained/{name}"] == pytest.approx(evaluated[f"test/{name}"], abs=1e-6)
    assert metrics["pretrained/recall@1"] != metrics["baseline/recall@1"]

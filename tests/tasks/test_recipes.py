"""The benchmark recipes compose into what their headers say, their optimizers build, and
scripts/reproduce_benchmarks.sh + scripts/benchmark_table.py turn run folders into a table."""

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from tests.conftest import CONF, compose_train

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DATASETS = ("cub200", "cars196", "sop", "inshop")
BENCHMARKS = [f"{d}_{b}" for d in DATASETS for b in ("resnet50", "vit_small")]


def header(name: str) -> str:
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def compose(name: str, tmp_path: Path, *extra: str):
    return compose_train([f"experiment={name}", "data.root=/nonexistent", *extra], tmp_path)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    cfg = compose(name, tmp_path)
    assert cfg.data.root == "/nonexistent"
    assert cfg.monitor == "val/recall@1"


def test_there_is_one_recipe_per_benchmark_and_backbone():
    assert set(BENCHMARKS) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_recipe_is_what_its_header_says(name, tmp_path):
    dataset, backbone = name.split("_", 1)
    cfg = compose(name, tmp_path)
    text = header(name)
    assert re.search(r"^# Target: R@1 \d+\.\d - .+\(.+\)", text, flags=re.M), "names its figure"
    assert f"python train.py experiment={name} data.root=" in text
    assert cfg.data.manifest._target_ == f"retrieval.datasets.converters.{dataset}"
    assert cfg.data.image_size == 224
    assert cfg.trainer.accelerator == "gpu"
    assert cfg.sampler.labels_per_batch * cfg.sampler.samples_per_label == 180
    embedder = cfg.model.embedder
    if backbone == "resnet50":
        assert "ResNet-50" in text and "512-d" in text and "Proxy-Anchor" in text
        assert cfg.backbone.name == "resnet50.tv_in1k"
        assert (embedder.embedding_dim, embedder.pooling, embedder.freeze_bn) == (
            512,
            "avgmax",
            True,
        )
        assert cfg.loss._target_.endswith("ProxyAnchorLoss") and cfg.miner is None
        assert cfg.model.frozen_backbone_epochs == 1 and cfg.model.loss_lr == 1e-2
        assert cfg.optimizer.lr == 1e-4 and cfg.model.layer_decay is None
    else:
        assert "ViT-S/16" in text and "384-d" in text and "DINO" in text
        assert cfg.backbone.name == "vit_small_patch16_224.dino"
        assert embedder.embedding_dim is None and embedder.pooling == "token"
        assert 0.65 <= cfg.model.layer_decay <= 0.75
        assert 1e-5 <= cfg.optimizer.lr <= 3e-5
        assert cfg.loss._target_.endswith("MultiSimilarityLoss")
        assert cfg.miner._target_.endswith("MultiSimilarityMiner")
    max_epochs = cfg.trainer.max_epochs
    assert 40 <= max_epochs <= 60 if dataset in ("cub200", "cars196") else 60 <= max_epochs <= 100


def test_command_line_overrides_reach_a_recipe(tmp_path):
    cfg = compose("sop_vit_small", tmp_path, "trainer=cpu", "data.num_workers=8")
    assert cfg.trainer.accelerator == "cpu" and cfg.data.num_workers == 8
    assert cfg.model.layer_decay == 0.75  # the recipe's own keys stay


@pytest.mark.parametrize("name", ["cub200_vit_small", "cub200_resnet50"])
def test_recipe_builds_its_optimizer_groups(name, tmp_path):
    cfg = compose(name, tmp_path)
    with open_dict(cfg):
        cfg.backbone.pretrained = False
    embedder = instantiate(cfg.model.embedder)
    with open_dict(cfg):  # as train.py measures them
        cfg.num_train_labels, cfg.embedding_size = 100, embedder.embedding_dim
    module = instantiate(cfg.model, embedder=embedder)
    module._trainer = SimpleNamespace(estimated_stepping_batches=1000)
    optimizer = module.configure_optimizers()["optimizer"]
    groups = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}  # before warm-up
    lr = cfg.optimizer.lr
    if name.endswith("vit_small"):
        assert embedder.embedding_dim == 384
        assert len(groups) == 14  # patch embedding, 12 blocks, final norm; no head, no proxies
        assert groups["backbone.layer13"] == pytest.approx(lr)
        assert groups["backbone.layer0"] == pytest.approx(lr * 0.75**13)
    else:
        assert embedder.embedding_dim == 512
        assert groups == pytest.approx({"backbone": lr, "head": lr, "loss": 1e-2})


# ---------------------------------------------------------------- scripts


def table_module():
    spec = importlib.util.spec_from_file_location(
        "benchmark_table", ROOT / "scripts/benchmark_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_reads_run_folders(tmp_path):
    runs = tmp_path / "runs"
    done = runs / "cub200_resnet50"
    done.mkdir(parents=True)
    metrics = {
        "pretrained/recall@1": 0.52,
        "val/recall@1": 0.70,
        "val/recall@2": 0.80,
        "val/map@r": 0.25,
        "best/val/recall@1": 0.712,
        "best/checkpoint": "x/best.ckpt",
    }
    (done / "metrics.json").write_text(json.dumps(metrics))
    (done / "config.yaml").write_text("trainer:\n  max_epochs: 40\n")
    (done / "wall_s").write_text("4000\n")
    (runs / "cars196_resnet50").mkdir()
    (runs / "cars196_resnet50" / "skipped.txt").write_text("/d/cars196 does not hold it\n")
    (runs / "sop_resnet50").mkdir()
    (runs / "sop_resnet50" / "train.log").write_text("Traceback ...\n")
    bt = table_module()
    names = ["cub200_resnet50", "cars196_resnet50", "sop_resnet50", "inshop_resnet50"]
    rows = bt.table(names, runs).splitlines()
    assert rows[0].startswith("| recipe | published target (source) | measured R@1 |")
    assert rows[2] == (
        "| cub200_resnet50 | R@1 73.4 - PFML (CVPR 2025), ResNet-50 512-d | 71.2 | last R@1 70.0, "
        "R@2 80.0, MAP@R 25.0, backbone as-is R@1 52.0 | 40 | 1h 06m |"
    )
    assert "skipped: /d/cars196 does not hold it" in rows[3]
    assert "failed, see" in rows[4] and "not run" in rows[5]
    out = tmp_path / "experiments" / "bench.md"
    bt.main([str(runs), "--recipes", *names, "--output", str(out)])
    assert out.read_text().startswith("# Benchmark recipes, ")
    with pytest.raises(FileNotFoundError, match="no such recipe"):
        bt.published_target("nope")


def run_script(tmp_path: Path, *args: str, data_root: Path | None = None):
    env = {**os.environ, "DRY_RUN": "1", "RUNS": str(tmp_path / "runs")}
    if data_root is not None:
        env["DATA_ROOT"] = str(data_root)
    return subprocess.run(
        ["bash", "scripts/reproduce_benchmarks.sh", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_reproduce_script_skips_missing_datasets_and_prints_commands(tmp_path):
    data = tmp_path / "data"
    (data / "CUB_200_2011").mkdir(parents=True)
    (data / "CUB_200_2011" / "images.txt").write_text("")
    done = run_script(tmp_path, data_root=data)
    assert done.returncode == 0, done.stderr
    for name in ("cub200_resnet50", "cub200_vit_small"):
        assert f"python train.py experiment={name} data.root={data}/CUB_200_2011" in done.stdout
    assert "skipping cars196_resnet50" in done.stderr and "skipping inshop_vit_small" in done.stderr
    assert "scripts/benchmark_table.py" in done.stdout
    only = run_script(tmp_path, "--only", "cub200_vit_small", data_root=data)
    assert "experiment=cub200_vit_small" in only.stdout
    assert "experiment=cub200_resnet50" not in only.stdout
    assert run_script(tmp_path, "--only", "nope", data_root=data).returncode == 2
    assert "DATA_ROOT" in run_script(tmp_path).stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_reproduce_script_scores_the_revisited_recipes_where_their_data_is(tmp_path):
    data = tmp_path / "data"
    (data / "roxford5k" / "jpg").mkdir(parents=True)
    (data / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"")
    done = run_script(tmp_path, data_root=data)
    assert done.returncode == 0, done.stderr
    for recipe in ("resnet50_gem", "dinov2_gem"):
        command = f"python evaluate.py experiment=revisited_{recipe} data=roxford5k"
        assert f"{command} data.root={data}/roxford5k" in done.stdout
        assert f"skipping rparis6k_{recipe}" in done.stderr
    # cirtorch's recipe needs its SfM-120k checkpoint; R1M needs the distractors
    assert "skipping sfm120k_resnet101_gem" in done.stderr
    assert "+distractors=r1m" not in done.stdout
    only = run_script(tmp_path, "--only", "roxford5k_dinov2_gem", data_root=data)
    assert only.returncode == 0 and "experiment=revisited_dinov2_gem" in only.stdout
    assert "python train.py" not in only.stdout and "benchmark_table.py" not in only.stdout
    assert not (tmp_path / "runs").exists()


def test_reproduce_script_trains_on_sfm120k_once_and_adds_r1m_where_it_is(tmp_path):
    data = tmp_path / "data"
    for name in ("roxford5k", "rparis6k"):
        (data / name / "jpg").mkdir(parents=True)
        (data / name / f"gnd_{name}.pkl").write_bytes(b"")
    (data / "sfm120k" / "ims").mkdir(parents=True)
    (data / "sfm120k" / "retrieval-SfM-120k.pkl").write_bytes(b"")
    (data / "revisitop1m" / "jpg").mkdir(parents=True)
    (data / "revisitop1m" / "revisitop1m.txt").write_text("")
    done = run_script(tmp_path, data_root=data)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    train = [line for line in lines if "python train.py experiment=sfm120k_resnet101_gem" in line]
    assert len(train) == 1 and f"data.root={data}/sfm120k" in train[0]
    ckpt = f"ckpt_path={tmp_path}/runs/sfm120k_resnet101_gem/checkpoints/best.ckpt"
    scored = [line for line in lines if "experiment=revisited_resnet101_gem" in line]
    assert len(scored) == 4  # two datasets, each with and without R1M
    assert all(ckpt in line and f"fit_data.root={data}/sfm120k" in line for line in scored)
    assert lines.index(train[0]) < lines.index(scored[0])
    with_r1m = f"+distractors=r1m distractors.root={data}/revisitop1m"
    r1m = [line for line in lines if with_r1m in line]
    assert len(r1m) == 6 and all("+r1m/evaluate.log" in line for line in r1m)

"""Resuming a run goes on with the run's own config (the command's overrides on top, what differs
printed, no best score carried over from other validation data), and Ctrl-C or SIGTERM while
training leaves ``last.ckpt`` and prints the command that resumes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from retrieval.tasks.config import compose_config
from retrieval.tasks.resume import plan_resume
from retrieval.tasks.train import train
from tests.tasks.test_train import fast_cfg

ROOT = Path(__file__).resolve().parents[2]
FIRST = ["debug=fast", "backbone.pretrained=false", "baseline_pretrained=false"]


def fake_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A run folder as train.py leaves it: its overrides and resolved config, a checkpoint."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = compose(overrides, run)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return run


def compose(overrides: list[str], out: Path) -> DictConfig:
    """The config train.py composes, writing into ``out`` (data under the test's folder)."""
    data = out.parent / "data"
    return compose_config([f"paths.data_dir={data}", f"paths.output_dir={out}", *overrides])


def test_a_resume_composes_the_run_overrides_with_the_command_on_top(tmp_path: Path) -> None:
    run = fake_run(tmp_path, ["debug=fast", "trainer.max_epochs=4", "sampler.labels_per_batch=6"])
    ckpt = str(run / "checkpoints" / "last.ckpt")
    command = [f"ckpt_path={ckpt}", "trainer.max_epochs=8"]
    plan = plan_resume(ckpt, command, lambda o: compose(o, tmp_path / "new"))
    assert plan.overrides == ["debug=fast", "sampler.labels_per_batch=6", *command]
    assert plan.changed == {"trainer.max_epochs": (4, 8)}
    assert plan.carry_best
    lines = plan.lines()
    assert lines[0].startswith(f"resuming {run} with its config (debug=fast ")
    assert "  trainer.max_epochs: 4 -> 8" in lines


def test_other_validation_data_does_not_carry_the_best_score(tmp_path: Path) -> None:
    run = fake_run(tmp_path, ["debug=fast"])
    ckpt = str(run / "checkpoints" / "last.ckpt")
    plan = plan_resume(
        ckpt, [f"ckpt_path={ckpt}", "data.max_labels=null"], lambda o: compose(o, tmp_path / "new")
    )
    assert plan.changed == {"data.max_labels": (8, None)}
    assert not plan.carry_best
    assert "best checkpoint starts afresh" in plan.lines()[-1]
    loading = plan_resume(
        ckpt, [f"ckpt_path={ckpt}", "data.num_workers=2"], lambda o: compose(o, tmp_path / "new")
    )
    assert loading.carry_best  # how data loads is not what it holds


def test_a_checkpoint_outside_a_run_folder_resumes_as_the_command_says(tmp_path: Path) -> None:
    ckpt = tmp_path / "elsewhere.ckpt"
    ckpt.write_bytes(b"weights")
    plan = plan_resume(str(ckpt), [f"ckpt_path={ckpt}"], lambda o: compose(o, tmp_path / "new"))
    assert (
        plan.run_dir is None and "resuming with this command's config as given" in plan.lines()[0]
    )
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        plan_resume(str(tmp_path / "none.ckpt"), [], lambda o: compose(o, tmp_path / "new"))


@pytest.mark.slow
def test_train_py_resumes_with_the_run_config_and_starts_the_best_afresh(tmp_path: Path) -> None:
    def train_py(*overrides: str) -> str:
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.log_dir={tmp_path}/logs"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    train_py(*FIRST, "baseline_untrained=false")
    runs = tmp_path / "logs" / "train" / "runs"
    (run,) = [p for p in runs.iterdir() if not p.is_symlink()]
    assert (runs / "latest").resolve() == run.resolve()
    first = json.loads((run / "metrics.json").read_text())
    ckpt = runs / "latest" / "checkpoints" / "last.ckpt"  # as the README writes it
    out = train_py(f"ckpt_path={ckpt}", "trainer.max_epochs=2", "data.max_labels=10")
    assert f"resuming {run} with its config (debug=fast " in out
    assert "  trainer.max_epochs: 1 -> 2" in out and "  data.max_labels: 8 -> 10" in out
    assert "the best checkpoint starts afresh" in out
    (second,) = [p for p in runs.iterdir() if p != run and not p.is_symlink()]
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["best/checkpoint"].startswith(str(second))
    assert metrics["best/val/recall@1"] == pytest.approx(metrics["val/recall@1"])
    assert first["best/val/recall@1"] != pytest.approx(metrics["val/recall@1"])
    saved = yaml.safe_load((second / ".hydra" / "overrides.yaml").read_text())
    assert saved[0] == "debug=fast" and "trainer.max_epochs=2" in saved
    assert f"ckpt_path={run.resolve() / 'checkpoints' / 'last.ckpt'}" in saved  # the file itself
    # the console in one format, and kept in the run's train.log
    assert not re.search(r"^\[\d{4}-\d\d-\d\d ", out, re.MULTILINE), out
    log = (second / "train.log").read_text()
    assert f"resuming {run} with its config" in log and "run directory: " in log
    assert (run.parent / "latest").resolve() == second.resolve()


def short_run(manifest: Path, tmp_path: Path, *extra: str) -> DictConfig:
    """A few steps on 10 labels of the demo slice, no baselines."""
    return fast_cfg(
        manifest,
        tmp_path,
        "backbone.pretrained=false",
        "baseline_pretrained=false",
        "baseline_untrained=false",
        "data.max_labels=10",
        *extra,
    )


class Interrupt(Callback):
    """Ctrl-C (``KeyboardInterrupt``), or a SIGTERM as Lightning's loops raise it, after
    ``step`` optimizer steps."""

    def __init__(self, step: int, sigterm: bool = False) -> None:
        self.step, self.sigterm = step, sigterm

    def on_train_batch_end(self, trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException() if self.sigterm else KeyboardInterrupt


@pytest.mark.parametrize(("sigterm", "code"), [(False, 1), (True, 143)])
def test_ctrl_c_leaves_last_ckpt_and_prints_how_to_resume(
    small_demo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sigterm: bool,
    code: int,
) -> None:
    cfg = short_run(small_demo, tmp_path)
    with open_dict(cfg):
        cfg.callbacks.interrupt = {
            "_target_": f"{__name__}.Interrupt",
            "step": 3,
            "sigterm": sigterm,
        }
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == code  # never 0: "train.py && export.py" must stop
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err
    assert f"interrupted at epoch 0, step 3; the last checkpoint is {last}" in err
    assert f"resume with: python train.py ckpt_path={last}" in err
    assert "weights_only" not in err
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3


def test_a_finished_run_resumed_without_more_epochs_says_how_to_train_on(
    small_demo: Path, tmp_path: Path
) -> None:
    from retrieval.tasks.resume import _check_epochs_left, epochs_trained

    cfg = short_run(small_demo, tmp_path, "trainer.max_epochs=2")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert epochs_trained(last) == 2
    with pytest.raises(ValueError, match=r"has trained 2 epochs.*trainer.max_epochs=3"):
        _check_epochs_left(str(last), 2)
    _check_epochs_left(str(last), 3)  # one more to train: no complaint
    assert epochs_trained(tmp_path / "nothing.ckpt") is None

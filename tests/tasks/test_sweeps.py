"""Sweeps and clusters: the Optuna overlay, the SLURM launcher config, and multiruns in which a
failed job is recorded in its run directory while the other jobs go on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from retrieval.tasks.runs import ERROR_FILE, monitored_value, run_task
from tests.conftest import CONF

REPO = Path(__file__).resolve().parents[2]


def compose_with_hydra(overrides: list[str], tmp_path: Path) -> DictConfig:
    """The training config with its ``hydra`` node, set as the current HydraConfig."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.output_dir={tmp_path}/out", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _restore_hydra_config():
    """These tests set the process-wide HydraConfig (a multirun job); put the old one back."""
    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


def as_job(tmp_path: Path, mode: RunMode) -> Path:
    """Make this process look like a job of ``mode`` whose run directory is ``tmp_path/job``."""
    cfg = compose_with_hydra([], tmp_path)
    run_dir = tmp_path / "job"
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    return run_dir


def _boom(cfg: DictConfig) -> float:
    raise RuntimeError("loss went to NaN in step 7")


# run_task and the value a sweep optimises


def test_a_single_run_raises_the_error_unchanged(tmp_path):
    run_dir = as_job(tmp_path, RunMode.RUN)
    with pytest.raises(RuntimeError, match="loss went to NaN in step 7"):
        run_task(_boom, OmegaConf.create())
    assert not (run_dir / ERROR_FILE).exists()
    assert run_task(lambda cfg: 0.5, OmegaConf.create()) == 0.5


def test_a_multirun_job_records_its_error_and_returns(tmp_path, caplog):
    run_dir = as_job(tmp_path, RunMode.MULTIRUN)
    assert run_task(_boom, OmegaConf.create()) is None
    assert run_task(_boom, OmegaConf.create(), failed=({}, None)) == ({}, None)
    text = (run_dir / ERROR_FILE).read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "in _boom" in text and text.rstrip().endswith("RuntimeError: loss went to NaN in step 7")
    assert [p.name for p in run_dir.iterdir()] == [ERROR_FILE]  # no temporary file left
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and str(run_dir / ERROR_FILE) in errors[-1].getMessage()
    assert "job 3" in errors[-1].getMessage()
    assert run_task(lambda cfg: 0.5, OmegaConf.create()) == 0.5


def test_an_interrupt_stops_the_whole_sweep(tmp_path):
    run_dir = as_job(tmp_path, RunMode.MULTIRUN)

    def interrupted(cfg: DictConfig) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_task(interrupted, OmegaConf.create())
    assert not (run_dir / ERROR_FILE).exists()


def test_the_sweep_value_is_the_best_monitored_value():
    metrics = {"val/recall@1": 0.4, "best/val/recall@1": 0.6, "val/map@r": 0.2}
    assert monitored_value(metrics, "val/recall@1") == 0.6
    value = monitored_value({"val/map@r": 0.2}, "val/map@r")
    assert value == 0.2 and type(value) is float
    with pytest.raises(KeyError, match=r"monitor=val/recall@10 .*'val/map@r'"):
        monitored_value(metrics, "val/recall@10")


# the Optuna overlay


def extreme(distribution: Any, pick: int) -> Any:
    """The first (``pick=0``) or last (``-1``) value an Optuna distribution can take."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[pick]
    return (distribution.low, distribution.high)[pick]


@pytest.mark.filterwarnings("ignore::sqlalchemy.exc.MovedIn20Warning")  # optuna 2.10's import
def test_optuna_overlay_maximises_the_monitor_over_keys_that_exist(tmp_path):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = compose_with_hydra(["hparams_search=optuna"], tmp_path)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.storage is None
    assert sweeper.n_trials == 20 and isinstance(sweeper.sampler.seed, int)
    assert "hparams_search" not in cfg  # an overlay: nothing of its own in the run's config
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and set(space) == set(sweeper.params)
    for pick in (0, -1):  # every key takes its extreme values in a real training config
        values = {k: extreme(d, pick) for k, d in space.items()}
        trial = compose_with_hydra(
            ["hparams_search=optuna", *(f"{k}={v}" for k, v in values.items())], tmp_path
        )
        for key, value in values.items():
            assert OmegaConf.select(trial, key.lstrip("+")) == value
        assert instantiate(trial.miner).epsilon == values["++miner.epsilon"]
        assert instantiate(trial.optimizer).keywords["lr"] == values["optimizer.lr"]


# the SLURM launcher


def slurm_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> str:
    """The sbatch script `python train.py -m hydra/launcher=slurm OVERRIDES` would submit: the
    plugin's own launch code runs up to the submission, which a stand-in intercepts."""
    import submitit

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path(sys.executable).parent}")
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep", *overrides], tmp_path
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    executors = []

    def intercept(executor, fn, *job_args):
        executors.append(executor)
        raise InterruptedError("not submitted")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", intercept)
    with pytest.raises(InterruptedError):
        launcher.launch([["seed=1"]], initial_job_idx=0)
    return executors[0]._executor._make_submission_file_text("python -m job", "uid")


def test_slurm_launcher_asks_one_task_per_gpu(tmp_path, monkeypatch):
    script = slurm_script(
        tmp_path,
        monkeypatch,
        "trainer=gpu",
        "trainer.devices=4",
        "+trainer.num_nodes=2",
        "hydra.launcher.partition=a100",
    )
    lines = set(script.splitlines())
    for line in (
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --nodes=2",
        "#SBATCH --partition=a100",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem-per-gpu=32G",
        "#SBATCH --time=1440",
    ):
        assert line in lines, script
    assert f"{tmp_path}/sweep/.submitit/" in script
    assert any(ln.startswith("srun ") and ln.endswith("python -m job") for ln in lines)


def test_slurm_launcher_defaults_to_one_gpu_and_refuses_devices_auto(tmp_path, monkeypatch):
    script = slurm_script(tmp_path, monkeypatch)
    assert "#SBATCH --gpus-per-node=1" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "--partition" not in script  # the cluster's default partition unless given
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer.devices=auto"], tmp_path / "b")
    with pytest.raises(Exception, match="'auto'"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


# real multiruns, each in its own process


def tiny_training(manifest: Path, tmp_path: Path) -> list[str]:
    return [
        "logger=csv",
        "data=manifest",
        f"data.manifest={manifest}",
        "data.image_size=64",
        "data.num_workers=0",
        "data.max_labels=4",
        "data.eval_batch_size=64",
        "backbone.pretrained=false",
        "sampler.labels_per_batch=4",
        "sampler.samples_per_label=4",
        "trainer.max_epochs=1",
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def assert_one_trained_one_failed(sweep: Path) -> None:
    """Job 0 trained (sampler.labels_per_batch=4); job 1 (=1000) left its error."""
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert 0 < metrics["best/val/recall@1"] <= 1 and not (sweep / "0" / ERROR_FILE).exists()
    error = (sweep / "1" / ERROR_FILE).read_text()
    assert error.startswith("Traceback") and "labels_per_batch=1000" in error
    assert "ValueError: sampler needs" in error
    assert not (sweep / "1" / "metrics.json").exists()


@pytest.mark.slow
def test_a_failed_training_does_not_stop_a_multirun(small_demo, tmp_path):
    done = run(
        [
            sys.executable,
            "train.py",
            "-m",
            *tiny_training(small_demo, tmp_path),
            "sampler.labels_per_batch=4,1000",
        ]
    )
    assert_one_trained_one_failed(tmp_path / "sweep")
    assert "failed; the sweep goes on" in done.stdout + done.stderr


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_its_own_process(small_demo, tmp_path):
    run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hydra/launcher=submitit_local",
            *tiny_training(small_demo, tmp_path),
            "sampler.labels_per_batch=4,1000",
        ]
    )
    sweep = tmp_path / "sweep"
    assert_one_trained_one_failed(sweep)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2


@pytest.mark.slow
def test_optuna_sweep_trains_each_trial_and_reports_the_best(small_demo, tmp_path):
    run(
        [
            sys.executable,
            "train.py",
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            *tiny_training(small_demo, tmp_path),
        ]
    )
    sweep = tmp_path / "sweep"
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    space = compose_with_hydra(["hparams_search=optuna"], tmp_path).hydra.sweeper.params
    assert result["name"] == "optuna" and set(result["best_params"]) == set(space)
    scores = {
        n: json.loads((sweep / n / "metrics.json").read_text())["best/val/recall@1"]
        for n in ("0", "1")
    }
    assert result["best_value"] == max(scores.values())
    best = max(scores, key=lambda n: scores[n])
    overrides = yaml.safe_load((sweep / best / ".hydra" / "overrides.yaml").read_text())
    assert {f"{k}={v}" for k, v in result["best_params"].items()} <= set(overrides)


FAKE_TRAIN = """
import hydra
from hydra.core.hydra_config import HydraConfig
from retrieval.tasks.runs import run_task

def objective(cfg):
    if HydraConfig.get().job.num == 0:
        raise RuntimeError("job 0 breaks on purpose")
    return float(cfg.optimizer.lr)

@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg):
    return run_task(objective, cfg)

main()
"""


@pytest.mark.parametrize(
    "sweep_args",
    [["optimizer.lr=0.1,0.2,0.3"], ["hparams_search=optuna", "hydra.sweeper.n_trials=3"]],
    ids=["basic", "optuna"],
)
def test_a_failed_job_leaves_its_error_and_the_sweep_goes_on(sweep_args, tmp_path):
    """Without training: a task whose job 0 raises, under the basic and the Optuna sweeper.
    (hydra-optuna-sweeper aborts the whole study on a NaN result: run_task returns None.)"""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN.replace("CONF", repr(str(CONF))))
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    run([sys.executable, str(script), "-m", *sweep_args, f"hydra.sweep.dir={sweep}"], env=env)
    assert "RuntimeError: job 0 breaks on purpose" in (sweep / "0" / ERROR_FILE).read_text()
    assert not (sweep / "1" / ERROR_FILE).exists() and not (sweep / "2" / ERROR_FILE).exists()
    logs = {n: (sweep / n / "fake_train.log").read_text() for n in ("0", "1", "2")}
    assert "failed; the sweep goes on" in logs["0"] and "failed" not in logs["1"] + logs["2"]
    if "hparams_search=optuna" in sweep_args:
        lrs = [
            float(o.split("=", 1)[1])
            for n in ("1", "2")
            for o in yaml.safe_load((sweep / n / ".hydra" / "overrides.yaml").read_text())
            if o.startswith("optimizer.lr=")
        ]
        result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
        assert len(lrs) == 2 and result["best_value"] == pytest.approx(max(lrs))

"""Checkpoints across epochs and resumes: ``last.ckpt`` is the last epoch whatever the monitored
metric did, a resume from it trains the next epoch, and a resume into another run directory keeps
the original run's best score and best checkpoint.

The monitored value is scripted (``val/recall@1`` replaced, one value per validation) so that it
gets worse after the first epoch; everything else is a real training run on the demo slice."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import retrieval.tasks.train as train_task
import retrieval.training.module as module_code
from tests.tasks.test_train import fast_cfg

COMMON = [
    "backbone.pretrained=false",
    "data.max_labels=6",
    "baseline_pretrained=false",
    "baseline_untrained=false",
]
# Epoch 0 is the best; epochs 1 and 2 are worse (and 2 better than 1, so it is not "monotone").
FIRST = [0.59, 0.42, 0.50]


def script_recall(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> list[float]:
    """Make each validation report the next of ``scores`` as ``recall@1`` (0.0 once they are
    used up); returns the values not yet used (empty once every scripted validation ran)."""
    real = module_code.evaluate_protocol
    left = list(scores)

    def scripted(*args, **kwargs):
        result, q, g = real(*args, **kwargs)
        metrics = {**result.metrics, "recall@1": left.pop(0) if left else 0.0}
        return SimpleNamespace(metrics=metrics, num_excluded=result.num_excluded), q, g

    monkeypatch.setattr(module_code, "evaluate_protocol", scripted)
    return left


def record_epochs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The epochs that training runs, in order, from the trainer of every later ``train``."""
    from lightning.pytorch.callbacks import Callback

    epochs: list[int] = []

    class RecordEpochs(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            epochs.append(trainer.current_epoch)

    real_build = train_task.build

    def build_recording(cfg):
        objects = real_build(cfg)
        objects["trainer"].callbacks.append(RecordEpochs())
        return objects

    monkeypatch.setattr(train_task, "build", build_recording)
    return epochs


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_run(small_demo, tmp_path_factory):
    """Three epochs whose monitored value is best at epoch 0, then worse."""
    root = tmp_path_factory.mktemp("first")
    with pytest.MonkeyPatch.context() as monkeypatch:
        left = script_recall(monkeypatch, FIRST)
        epochs = record_epochs(monkeypatch)
        cfg = fast_cfg(small_demo, root, *COMMON, "trainer.max_epochs=3")
        metrics, objects = train_task.train(cfg)
    assert not left and epochs == [0, 1, 2]
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    return SimpleNamespace(
        metrics=metrics,
        ckpts=ckpts,
        per_epoch=len(objects["trainer"].train_dataloader),
        best_digest=digest(ckpts / "best.ckpt"),
    )


@pytest.mark.slow
def test_last_checkpoint_is_the_last_epoch_and_best_the_best(first_run):
    last = load(first_run.ckpts / "last.ckpt")
    best = load(first_run.ckpts / "best.ckpt")
    assert last["epoch"] == 2 and last["global_step"] == 3 * first_run.per_epoch
    assert best["epoch"] == 0 and best["global_step"] == first_run.per_epoch
    assert first_run.metrics["best/val/recall@1"] == pytest.approx(0.59)
    assert first_run.metrics["best/checkpoint"] == str(first_run.ckpts / "best.ckpt")
    assert first_run.metrics["val/recall@1"] == pytest.approx(0.50)  # the last validation
    assert sorted(p.name for p in first_run.ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_resume_from_last_continues_at_the_next_epoch(first_run, small_demo, tmp_path, monkeypatch):
    left = script_recall(monkeypatch, [0.45, 0.48])
    epochs = record_epochs(monkeypatch)
    cfg = fast_cfg(
        small_demo,
        tmp_path,
        *COMMON,
        "trainer.max_epochs=5",
        f"ckpt_path={first_run.ckpts / 'last.ckpt'}",
    )
    _, objects = train_task.train(cfg)
    assert not left and epochs == [3, 4]
    assert objects["trainer"].global_step == 5 * first_run.per_epoch
    last = load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 4 and last["global_step"] == 5 * first_run.per_epoch


@pytest.mark.slow
def test_resume_into_another_folder_keeps_the_best(first_run, small_demo, tmp_path, monkeypatch):
    """Worse epochs after the resume: the new run reports the original best and holds a copy of
    its checkpoint; a better epoch later replaces it. The original run's files stay as they were."""
    resume = f"ckpt_path={first_run.ckpts / 'last.ckpt'}"
    script_recall(monkeypatch, [0.42, 0.48])
    cfg = fast_cfg(small_demo, tmp_path / "worse", *COMMON, "trainer.max_epochs=5", resume)
    metrics, _ = train_task.train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert ckpts != first_run.ckpts
    assert metrics["best/val/recall@1"] == pytest.approx(0.59)
    assert metrics["best/checkpoint"] == str(ckpts / "best.ckpt")
    assert digest(ckpts / "best.ckpt") == first_run.best_digest  # not replaced by a worse one
    assert load(ckpts / "last.ckpt")["epoch"] == 4
    # the state stored in the new run's checkpoints carries the original best, for a next resume
    state = next(s for s in load(ckpts / "last.ckpt")["callbacks"].values() if s.get("monitor"))
    assert float(state["best_model_score"]) == pytest.approx(0.59)
    assert state["best_model_path"] == str(ckpts / "best.ckpt")

    script_recall(monkeypatch, [0.42, 0.65])
    cfg = fast_cfg(small_demo, tmp_path / "better", *COMMON, "trainer.max_epochs=5", resume)
    metrics, _ = train_task.train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert metrics["best/val/recall@1"] == pytest.approx(0.65)
    assert load(ckpts / "best.ckpt")["epoch"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert digest(first_run.ckpts / "best.ckpt") == first_run.best_digest


def test_state_of_a_plain_model_checkpoint_is_taken_over(tmp_path):
    """A checkpoint written before RunCheckpoint (a plain ModelCheckpoint's state key) resumes the
    same way; a top-k file that no longer exists keeps its score and path."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from retrieval.training.checkpoints import RunCheckpoint

    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "best.ckpt").write_bytes(b"weights")
    plain = ModelCheckpoint(dirpath=old_dir, filename="best", monitor="val/recall@1", mode="max")
    state = {
        **plain.state_dict(),
        "best_model_score": torch.tensor(0.59),
        "best_model_path": str(old_dir / "best.ckpt"),
        "best_k_models": {str(old_dir / "best.ckpt"): torch.tensor(0.59)},
    }
    other = ModelCheckpoint(dirpath=old_dir, filename="e{epoch}", save_top_k=-1)
    states = {plain.state_key: state, other.state_key: other.state_dict()}
    new = RunCheckpoint(
        dirpath=tmp_path / "new", filename="best", monitor="val/recall@1", mode="max"
    )
    assert new.state_key != plain.state_key
    assert new._state_in(states) is state
    assert (
        RunCheckpoint(dirpath=tmp_path, monitor="val/recall@1", mode="min")._state_in(states)
        is None
    )
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda x: x))
    new._go_on_from(trainer, state)
    assert new.best_model_path == str(tmp_path / "new" / "best.ckpt")
    assert (tmp_path / "new" / "best.ckpt").read_bytes() == b"weights"
    assert float(new.best_model_score) == pytest.approx(0.59)
    assert new.kth_best_model_path == new.best_model_path and float(new.kth_value) == pytest.approx(
        0.59
    )

    (old_dir / "best.ckpt").unlink()
    gone = RunCheckpoint(
        dirpath=tmp_path / "gone", filename="best", monitor="val/recall@1", mode="max"
    )
    gone._go_on_from(trainer, state)
    assert gone.best_model_path == str(old_dir / "best.ckpt")
    assert float(gone.best_model_score) == pytest.approx(0.59)

"""Training checkpoints: writing them during training (:class:`RunCheckpoint`, the callback of
``conf/callbacks/default.yaml``), and reading them without unpickling code: the Embedder's weights
and the run's config (``run_config``, stored by
:class:`~retrieval.training.module.RetrievalModule`)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from retrieval.infra.io import sha256_file

__all__ = [
    "CheckpointError",
    "RunCheckpoint",
    "TrainingCheckpoint",
    "load_embedder_weights",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

_PREFIX = "model."  # the Embedder's attribute in RetrievalModule


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not a training checkpoint, or does not fit a model."""


@dataclass(frozen=True)
class TrainingCheckpoint:
    """What evaluation and export need from a checkpoint.

    Attributes:
        path: the file.
        sha256: hex digest of the file, to name exactly which weights produced a result.
        embedder_state: the Embedder's state dict (keys without the module prefix).
        run_config: the resolved config of the training run (plain dicts and lists).
        epoch, global_step: where training was when it was saved.
    """

    path: Path
    sha256: str
    embedder_state: dict[str, torch.Tensor]
    run_config: dict[str, Any]
    epoch: int | None
    global_step: int | None


def read_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read a checkpoint written by ``train.py`` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing or unreadable, holds objects other than tensors and
            plain containers, or is not a checkpoint of this project's training (no
            ``state_dict`` with Embedder weights, or no ``run_config``).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} does not exist")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common base
        raise CheckpointError(f"cannot read checkpoint {file}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise CheckpointError(f"{file} is not a Lightning checkpoint (no 'state_dict')")
    state = {k[len(_PREFIX) :]: v for k, v in data["state_dict"].items() if k.startswith(_PREFIX)}
    if not state:
        raise CheckpointError(f"{file} holds no Embedder weights (no '{_PREFIX}*' keys)")
    run_config = data.get("run_config")
    if not isinstance(run_config, dict) or "model" not in run_config:
        raise CheckpointError(
            f"{file} has no run config ('run_config'): it was not written by train.py"
        )
    return TrainingCheckpoint(
        path=file,
        sha256=sha256_file(file),
        embedder_state=state,
        run_config=run_config,
        epoch=data.get("epoch"),
        global_step=data.get("global_step"),
    )


def load_embedder_weights(embedder: nn.Module, checkpoint: TrainingCheckpoint) -> None:
    """Load the checkpoint's weights into ``embedder``, which must have exactly its shapes.

    Raises:
        CheckpointError: missing, unexpected or differently shaped parameters, named (the
            model was built from a config other than the one the checkpoint was trained with).
    """
    own = embedder.state_dict()
    theirs = checkpoint.embedder_state
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    reshaped = [
        f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        parts = []
        for title, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape (checkpoint vs model)", reshaped),
        ):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                parts.append(f"{title}: {', '.join(names[:5])}{more}")
        raise CheckpointError(
            f"checkpoint {checkpoint.path} does not fit the model built from the config: "
            + "; ".join(parts)
        )
    embedder.load_state_dict(theirs, strict=True)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments) with two changes that make a resume exact.

    - ``save_last=True`` writes ``last.ckpt`` at the end of every training epoch, after that
      epoch's validation, whatever the monitored value did. Lightning 2.x writes it only when a
      top-k file is written, so with ``save_top_k=1`` it was the best epoch, and resuming from it
      trained again every epoch after the best one.
    - A resume into another ``dirpath`` (every run has its own directory) goes on from the top-k
      files and scores of the run it resumes from: they are copied into this ``dirpath`` and
      their scores kept, so the best score and ``best.ckpt`` are the best of the whole training,
      and a worse epoch after the resume replaces neither. Lightning itself keeps only
      ``best_model_path`` when the directory changes, and the first epoch after the resume
      became the best whatever its score. A file that no longer exists keeps its score and old
      path, with a warning. The run's state is found in the checkpoint by its monitored metric
      (and mode), so checkpoints written by a plain ``ModelCheckpoint`` resume the same way.
      ``carry_best=False`` (a resume validated on other data, :mod:`retrieval.tasks.resume`)
      takes over nothing: the best score starts afresh.
    - Ctrl-C or SIGTERM (a cluster's pre-emption) while training writes ``last.ckpt`` where
      training stopped and prints the command that resumes from it.
    """

    def __init__(self, *args: Any, carry_best: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.carry_best = carry_best
        self._resumed_state: dict[str, Any] | None = None
        self._last_written_step: int | None = None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resumed_state = self._state_in(checkpoint.get("callbacks") or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
        # else another run's directory: taken over at train start (Lightning would warn and keep
        # only best_model_path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # Here every restore of fit is done, whatever the strategy's order of restore and setup.
        state, self._resumed_state = self._resumed_state, None
        if state is not None and self.carry_best:
            self._go_on_from(trainer, state)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """On Ctrl-C or SIGTERM: ``last.ckpt`` as training stopped, and how to resume."""
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not self.dirpath:
            return
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        if trainer.global_step == 0:
            if trainer.is_global_zero:
                print(f"\ninterrupted at {where}: nothing trained yet", file=sys.stderr)
            return
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, weights_only=False)  # a full state: training resumes from it
        if trainer.is_global_zero:
            print(
                f"\ninterrupted at {where}; the last checkpoint is {path}\n"
                f"resume with: python train.py ckpt_path={path}",
                file=sys.stderr,
                flush=True,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # top-k (and last with it) when due
        if (
            self.save_last is True
            and not getattr(trainer, "fast_dev_run", False)  # set by the trainer, untyped
            and self._last_written_step != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def _state_in(self, states: dict[Any, Any]) -> dict[str, Any] | None:
        """This callback's state among a checkpoint's callback states: the one under its own state
        key, else the only ``ModelCheckpoint`` state with the same monitor and mode."""
        if isinstance(states.get(self.state_key), dict):
            return states[self.state_key]
        if self.monitor is None:
            return None
        found = [
            state
            for key, state in states.items()
            if isinstance(key, str)
            and f"'mode': '{self.mode}'" in key
            and isinstance(state, dict)
            and "best_k_models" in state
            and state.get("monitor") == self.monitor
        ]
        return found[0] if len(found) == 1 else None

    def _go_on_from(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        """Take over the top-k files and scores of the run resumed from (see the class)."""
        if self.monitor is None or self.save_top_k == 0:
            return
        if state.get("dirpath") == self.dirpath and self.best_model_score is not None:
            return  # the same directory: Lightning has restored all of it
        scores = dict(state.get("best_k_models") or {})
        if (
            not scores
            and state.get("best_model_path")
            and state.get("best_model_score") is not None
        ):
            scores = {state["best_model_path"]: state["best_model_score"]}
        if not scores:
            return
        best_first = sorted(scores, key=lambda p: float(scores[p]), reverse=self.mode == "max")
        if self.save_top_k > 0:
            best_first = best_first[: self.save_top_k]
        kept: dict[str, float] = {}
        if trainer.is_global_zero:
            for old in best_first:
                kept[self._take_over(old)] = float(scores[old])
        kept = trainer.strategy.broadcast(kept)  # also waits for rank 0's copies
        self.best_k_models = {path: torch.tensor(score) for path, score in kept.items()}
        order = sorted(kept, key=kept.get, reverse=self.mode == "max")  # type: ignore[arg-type]
        self.best_model_path = order[0]
        self.best_model_score = self.best_k_models[order[0]]
        if len(order) == self.save_top_k:
            self.kth_best_model_path = order[-1]
            self.kth_value = self.best_k_models[order[-1]]
        log.info(
            "resumed %s: best %s = %.4f (%s), taken over from %s",
            self.dirpath,
            self.monitor,
            float(self.best_model_score),
            self.best_model_path,
            state.get("dirpath"),
        )

    def _take_over(self, old: str) -> str:
        """Copy the top-k file ``old`` of the run resumed from into this ``dirpath`` under its own
        name (temp file, then rename); returns the path that now holds it."""
        assert self.dirpath is not None
        new = os.path.join(self.dirpath, os.path.basename(old))
        if os.path.abspath(old) == os.path.abspath(new):
            return new
        if not os.path.isfile(old):
            log.warning(
                "checkpoint %s of the run resumed from no longer exists: its %s score is kept, "
                "and a better epoch will replace it",
                old,
                self.monitor,
            )
            return old
        os.makedirs(self.dirpath, exist_ok=True)
        partial = new + ".partial"
        shutil.copyfile(old, partial)
        os.replace(partial, new)
        return new

"""Reading training checkpoints without unpickling code: the Embedder's weights and the run's
config (``run_config``, stored by :class:`~retrieval.module.RetrievalModule`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.io import sha256_file

__all__ = ["CheckpointError", "TrainingCheckpoint", "load_embedder_weights", "read_checkpoint"]

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

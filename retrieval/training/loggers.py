"""Weights & Biases logging that never prompts and never hangs.

The run goes online when the user is logged in (``WANDB_API_KEY`` or a netrc entry from
``wandb login``) and the W&B host answers; otherwise it is recorded offline, and the end of the run
prints where it is and the ``wandb sync`` command that uploads it. ``WANDB_MODE`` set by the user
wins.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

from retrieval.infra.io import network_reachable


def wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""


def wandb_logged_in() -> bool:
    """True when an API key is available without prompting."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(wandb_host()) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """``online``, ``offline`` or ``disabled``: the user's ``WANDB_MODE``, else online only when
    logged in and the host answers."""
    chosen = os.environ.get("WANDB_MODE")
    if chosen:
        return chosen
    return "online" if wandb_logged_in() and network_reachable(wandb_host()) else "offline"


def wandb_logger(
    project: str = "retrieval", save_dir: str = ".", mode: str | None = None, **kwargs: Any
) -> WandbLogger:
    """A Lightning ``WandbLogger`` in the mode chosen by :func:`wandb_mode` (or ``mode``). W&B's
    own console lines (its banner, the run history and summary, the sync hint) are off: the
    end of the run says in one line where the run went (:func:`describe_wandb`)."""
    import wandb

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("settings", wandb.Settings(silent=True))
    logger = WandbLogger(project=project, save_dir=save_dir, mode=mode or wandb_mode(), **kwargs)
    # Lightning passes anonymous=None, which W&B's settings warn about although it means
    # "not set"; left out, W&B uses its default.
    if logger._wandb_init.get("anonymous", "given") is None:
        del logger._wandb_init["anonymous"]
    return logger


def describe_wandb(logger: WandbLogger) -> str:
    """One line saying where the run went: its URL, or its offline folder and the sync command."""
    run = logger.experiment
    if getattr(run, "offline", False) or getattr(run.settings, "mode", "") == "offline":
        folder = Path(run.dir).parent
        return f"W&B run saved offline in {folder}; upload it with: wandb sync {folder}"
    url = getattr(run, "url", None)
    return f"W&B run: {url}" if url else "W&B logging disabled"


def finish_wandb(logger: WandbLogger) -> None:
    """End the logger's W&B run. Lightning leaves it open, and the next WandbLogger in the same
    process (a sweep's next job, the next test) would otherwise log into it."""
    if logger._experiment is not None:
        logger.experiment.finish()

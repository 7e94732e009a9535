"""Weights & Biases logging that never prompts and never hangs.

The run goes online when the user is logged in (``WANDB_API_KEY`` or a netrc entry from
``wandb login``) and the W&B host answers; otherwise it is recorded offline, and the end of the run
prints where it is and the ``wandb sync`` command that uploads it. ``WANDB_MODE`` set by the user
wins.

Silence third-party messages that tell the user nothing, each matched narrowly so every
other warning still shows.

- Lightning's "💡 Tip: ... litlogger" advertisement, logged at every Trainer's start, and its
  "Loading `train_dataloader` to estimate number of stepping batches" (an internal step).
- Lightning's "The number of training batches (N) is smaller than the logging interval": a
  small dataset logs once per epoch, which is what it should do.
- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation: Lightning's own code calling
  PyTorch, nothing a user can change.
- Lightning's "Found N module(s) in eval mode at the start of training" when those N modules
  are exactly the backbone's frozen BatchNorm layers (``freeze_bn``), which stay in eval mode
  by design (see :func:`expect_eval_modules`); any other module in eval mode still warns.

W&B's "anonymous setting has no effect" is avoided where it starts, in
:func:`retrieval.training.loggers.wandb_logger`; FAISS's k-means warnings are replaced by one
line of ours in :mod:`retrieval.index`.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import warnings
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


#: Loggers Lightning's rank_zero_info writes through (fabric's or pytorch's, whichever was
#: imported last).
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


_DROPPED = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_DROPPED)


_DROP_TIPS = _DropTips()


def quiet_third_party() -> None:
    """Install the filters (idempotent; process-wide, as warnings filters are). Where the
    application has configured the console (Hydra's handlers on the root logger), Lightning's
    own console handler on the ``lightning`` logger goes: its records reach the root's handler
    anyway, and were printed twice, once as ``INFO: ...``."""
    if logging.getLogger().handlers:
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            lightning.removeHandler(handler)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_TIPS not in logger.filters:
            logger.addFilter(_DROP_TIPS)
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        module=r"lightning\.",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
    )


def expect_eval_modules(count: int) -> None:
    """Lightning's warning that ``count`` modules are in eval mode at the start of training
    says nothing new: the caller checked they are the ones it keeps in eval mode. A different
    count still warns."""
    warnings.filterwarnings(
        "ignore",
        message=re.escape(f"Found {count} module(s) in eval mode at the start of training"),
    )

"""Silence third-party messages that tell the user nothing, each matched narrowly so every
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
import re
import warnings

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

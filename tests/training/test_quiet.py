"""Third-party noise is gone from training runs, and real warnings still show: Lightning's
litlogger tip, its eval-mode warning for the frozen BatchNorm layers (still given for any other
module in eval mode), W&B's anonymous-setting warning."""

from __future__ import annotations

import logging
import sys
import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss

from retrieval.models import Embedder, create_backbone
from retrieval.training import loggers
from retrieval.training.module import RetrievalModule

EVAL_MODE = "module(s) in eval mode at the start of training"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _trainer_messages() -> list[str]:
    """What Lightning logs while a Trainer is built."""
    handler, target = _Records(), logging.getLogger("lightning")
    target.addHandler(handler)
    try:
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    finally:
        target.removeHandler(handler)
    return handler.messages


def test_lightnings_litlogger_tip_is_dropped_and_its_other_lines_kept() -> None:
    for name in loggers._RANK_ZERO_LOGGERS:  # as in a process that has not installed it yet
        logging.getLogger(name).removeFilter(loggers._DROP_TIPS)
    assert any(m.startswith("💡 Tip:") for m in _trainer_messages())  # this Lightning has it
    loggers.quiet_third_party()
    messages = _trainer_messages()
    assert not [m for m in messages if "litlogger" in m]
    assert any(m.startswith("GPU available") for m in messages)


def _fit_warnings(freeze_bn: bool, head_in_eval: bool) -> list[str]:
    """Warnings of one training step of a BatchNorm backbone (Lightning's hints included)."""
    pl.seed_everything(0)
    embedder = Embedder(
        create_backbone("test_efficientnet", pretrained=False), 16, "avg", freeze_bn=freeze_bn
    )
    module = RetrievalModule(embedder, MultiSimilarityLoss(), partial(torch.optim.SGD, lr=1e-3))
    if head_in_eval:
        module.model.head.eval()  # a module in eval mode that nothing keeps so by design
    batches = [{"image": torch.randn(8, 3, 32, 32), "label": torch.arange(8) % 4}]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # filters installed during the fit go before this one
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("freeze_bn", "head_in_eval", "warned"),
    [(True, False, False), (True, True, True), (False, True, True)],
)
def test_eval_mode_warning_only_for_modules_not_frozen_by_design(
    freeze_bn: bool, head_in_eval: bool, warned: bool
) -> None:
    found = [m for m in _fit_warnings(freeze_bn, head_in_eval) if EVAL_MODE in m]
    assert bool(found) is warned, found


def test_wandb_logger_gives_no_anonymous_setting_warning(tmp_path, monkeypatch, capfd) -> None:
    """No warning about the anonymous setting, and none of W&B's own lines (its banner, the
    run history and summary, its sync hint): the run's one line says where it went."""
    from retrieval.training.loggers import describe_wandb, finish_wandb, wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = wandb_logger(save_dir=str(tmp_path))
    assert "anonymous" not in logger._wandb_init
    logger.log_metrics({"x": 1.0})
    line = describe_wandb(logger)
    finish_wandb(logger)
    out, err = capfd.readouterr()
    assert "anonymous" not in out + err
    assert "wandb:" not in out + err, out + err
    assert line.startswith(f"W&B run saved offline in {tmp_path}") and "wandb sync" in line
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_lightning_records_print_once_where_the_app_configured_the_console(capsys) -> None:
    """Imported after Hydra set up the console, Lightning's loggers propagate to the root
    logger, through ``lightning``'s own handler: every line came twice."""
    from retrieval.training import loggers

    root, lightning = logging.getLogger(), logging.getLogger("lightning")
    console = logging.StreamHandler(sys.stderr)
    own = logging.StreamHandler(sys.stderr)
    own.setFormatter(logging.Formatter("INFO: %(message)s"))
    saved = (list(lightning.handlers), root.level)
    root.addHandler(console)
    lightning.addHandler(own)
    root.setLevel(logging.INFO)
    try:
        loggers.quiet_third_party()
        logging.getLogger("lightning.a_child_of_it").info("Seed set to 42")
    finally:
        root.removeHandler(console)
        root.setLevel(saved[1])
        for handler in saved[0]:
            if handler not in lightning.handlers:
                lightning.addHandler(handler)
    printed = capsys.readouterr().err.splitlines()
    assert printed.count("Seed set to 42") == 1 and "INFO: Seed set to 42" not in printed

"""Training progress: a bar on a terminal, plain lines in a log, whatever extras are installed."""

from __future__ import annotations

import io

from lightning.pytorch.callbacks import TQDMProgressBar

from retrieval.progress import LineProgress, progress_bar
from retrieval.tasks.train import build, train
from tests.test_train import fast_cfg


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_tqdm_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress_bar(Terminal()), TQDMProgressBar)
    assert isinstance(progress_bar(io.StringIO()), LineProgress)


def test_training_into_a_log_writes_plain_lines(small_demo, tmp_path, capsys):
    cfg = fast_cfg(small_demo, tmp_path, "trainer.max_epochs=2")
    bars = [c for c in build(cfg)["callbacks"] if hasattr(c, "disable")]
    assert len(bars) == 1 and isinstance(bars[0], LineProgress)  # pytest's stderr is no tty
    train(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "validated" in line]
    # the untrained model is validated first, then each epoch
    assert [line.split("  ")[0] for line in lines] == ["validated", "epoch 1/2", "epoch 2/2"]
    assert all("val/recall@1" in line for line in lines)
    assert "\r" not in err  # no redraws: a log holds lines, not a bar
    assert max(len(line) for line in err.splitlines()) < 400

"""Training progress: a bar on a terminal, plain lines in a log, whatever extras are installed."""

from __future__ import annotations

import io

from lightning.pytorch.callbacks import TQDMProgressBar

from retrieval.infra.progress import LineProgress, progress_bar
from retrieval.tasks.train import build, train
from tests.tasks.test_train import fast_cfg


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


def test_track_writes_plain_lines_when_not_a_terminal() -> None:
    import io

    from retrieval.infra.progress import track

    out = io.StringIO()
    assert list(track(range(4), 4, "embedding", stream=out, every_s=0.0)) == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("embedding: 1/4 batches (25%), ") and "s left" in lines[0]
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[-1].startswith("embedding: 4 batches in ")


def test_embedding_reports_progress_in_a_log(capsys) -> None:
    import torch

    from retrieval.models.extract import embed_loader

    batches = [
        {
            "image": torch.ones(2, 3),
            "label": torch.zeros(2, dtype=torch.long),
            "index": torch.tensor([2 * i, 2 * i + 1]),
            "is_query": torch.ones(2, dtype=torch.bool),
            "is_gallery": torch.ones(2, dtype=torch.bool),
        }
        for i in range(3)
    ]
    embed_loader(torch.nn.Identity(), batches, "cpu", "fp32", progress_every_s=0.0)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("embedding: 1/3 batches")
    assert err[-1].startswith("embedding: 3 batches")

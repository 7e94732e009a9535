"""A run's console kept in its log file: prints, log records and progress bars' last states."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from retrieval.infra.progress import PlainFormatter, console_copy


def test_the_file_holds_what_the_console_showed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = logging.getLogger("tests.console")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with console_copy(tmp_path / "train.log"):
            print("generating the data ...")
            sys.stderr.write("epoch 1  10%\repoch 1  50%\r")
            sys.stderr.write("epoch 1 100%\n")
            log.info("a log record")
            print("metric  trained\nrecall@1  0.81", end="")
    finally:
        log.removeHandler(handler)
    shown = capsys.readouterr()
    assert "generating the data ..." in shown.out and "epoch 1  50%" in shown.err
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "generating the data ...",
        "epoch 1 100%",
        "a log record",
        "metric  trained",
        "recall@1  0.81",
    ]
    print("after the block")
    assert "after the block" not in (tmp_path / "train.log").read_text()


def test_a_file_handler_on_the_same_file_does_not_write_twice(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    root = logging.getLogger()
    file_handler = logging.FileHandler(path)
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(file_handler)
    root.addHandler(console)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with console_copy(path):
            logging.getLogger("tests.twice").info("once")
        assert file_handler in root.handlers
    finally:
        root.removeHandler(file_handler)
        root.removeHandler(console)
        file_handler.close()
        root.setLevel(old_level)
    assert path.read_text().count("once") == 1


def test_log_records_read_like_the_rest_of_the_output() -> None:
    formatter = PlainFormatter()

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("retrieval.x", level, __file__, 1, message, None, None)

    assert formatter.format(record(logging.INFO, "resumed RUN")) == "resumed RUN"
    assert (
        formatter.format(record(logging.WARNING, "3 images skipped")) == "warning: 3 images skipped"
    )
    assert formatter.format(record(logging.ERROR, "failed")) == "error: failed"

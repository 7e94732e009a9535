"""A run's console, kept: :func:`console_copy` writes what a command prints (stdout, stderr and
log records alike) into a file as well, e.g. ``RUN/train.log``, so that the file holds what the
terminal showed.

On the terminal nothing changes: the streams keep their ``isatty``, so progress bars still
draw. In the file a bar's redraws (text ended by a carriage return) are dropped and only its
last state, the one a newline ends, stays: one line per bar, not kilobytes of redraws.
Logging handlers that write to the console are pointed at the copies for the duration; a file
handler already writing the same file (Hydra's job log) is set aside, so no line is there twice.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["PlainFormatter", "console_copy", "first_process"]

#: variables a launcher sets to a process's rank (torchrun, SLURM, LSF, Lightning's own, nodes)
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK")


class PlainFormatter(logging.Formatter):
    """Log records on the console as the rest of a command's output: the message alone, with
    ``warning:`` or ``error:`` in front from those levels up (Hydra's console handler uses it,
    ``conf/hydra/default.yaml``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


def first_process() -> bool:
    """Whether this process is the first of a distributed run (or the only one), from the
    variables launchers set; known before any distributed setup."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def _last_state(line: str) -> str:
    """What a terminal last showed of ``line``: its last text between carriage returns."""
    return next((part for part in reversed(line.split("\r")) if part), "")


def _collapsed(pending: str) -> str:
    """A line still being written, its redraws dropped: the text after its last carriage
    return (the return kept, so later text still overwrites what came before it)."""
    if "\r" not in pending:
        return pending
    head, _, tail = pending.rpartition("\r")
    return "\r" + tail if tail else _last_state(head) + "\r"


class _Lines:
    """The file side: complete lines only, a carriage return dropping the line it ends."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            *complete, pending = (self.pending + text).split("\n")
            for line in complete:
                self.file.write(_last_state(line) + "\n")
            self.pending = _collapsed(pending)

    def close(self) -> None:
        with self.lock:
            if self.pending:
                self.file.write(self.pending + "\n")
            self.file.close()


class _Tee:
    """A text stream that writes to ``stream`` and to ``lines``."""

    def __init__(self, stream: IO[str], lines: _Lines) -> None:
        self.stream, self.lines = stream, lines

    def write(self, text: str) -> int:
        count = self.stream.write(text)
        self.lines.write(text)
        return count

    def flush(self) -> None:
        self.stream.flush()
        self.lines.file.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ... of the terminal
        return getattr(self.stream, name)


def _console_handlers(old: dict[int, IO[str]]) -> list[tuple[logging.StreamHandler, Any]]:
    """Every logging handler writing to one of the ``old`` streams (by id)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in old:
                found.append((handler, stream))
    return found


@contextmanager
def console_copy(path: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Within the block, copy stdout, stderr and console log records into ``path``
    (appended; see the module). ``enabled=False`` does nothing (a process other than the
    first of a distributed run)."""
    if not enabled:
        yield
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    same_file = [
        h
        for h in root.handlers
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == target.resolve()
    ]
    for handler in same_file:
        root.removeHandler(handler)
    lines = _Lines(target)
    out, err = sys.stdout, sys.stderr
    tees = {id(out): _Tee(out, lines), id(err): _Tee(err, lines)}
    handlers = _console_handlers({id(out): out, id(err): err})
    sys.stdout, sys.stderr = tees[id(out)], tees[id(err)]
    for handler, stream in handlers:
        handler.setStream(tees[id(stream)])  # type: ignore[arg-type]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        for handler, stream in handlers:
            handler.setStream(stream)
        lines.close()
        for handler in same_file:
            root.addHandler(handler)

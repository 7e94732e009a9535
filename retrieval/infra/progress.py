"""Progress of training and of embedding: tqdm's bar on a terminal, a plain periodic line
everywhere else.

A progress bar redraws itself with carriage returns; in a log file (SLURM output, CI, ``nohup``)
every redraw stays, and one epoch can become a single line of kilobytes. :func:`progress_bar`
picks the bar when stderr is a terminal and :class:`LineProgress` otherwise, always the same
kind whatever extras are installed (Lightning would switch to Rich when it is importable).

A run's console, kept: :func:`console_copy` writes what a command prints (stdout, stderr and
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
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

__all__ = [
    "LineProgress",
    "PlainFormatter",
    "console_copy",
    "first_process",
    "progress",
    "progress_bar",
    "track",
]


T = TypeVar("T")


def _number(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class LineProgress(ProgressBar):
    """Plain lines for logs: one every ``every_s`` seconds of training, and one at the end of
    each validation with its metrics, e.g.
    ``epoch 2/8  step 40/100  train/loss 0.351  6.2 it/s``."""

    def __init__(self, every_s: float = 30.0, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.every_s = float(every_s)
        self.stream = stream
        self._enabled = True
        self._last = 0.0
        self._epoch_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, file=self.stream or sys.stderr, flush=True)

    def _epoch(self, trainer: pl.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        return f"epoch {trainer.current_epoch + 1}/{total}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last = time.monotonic()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        done = batch_idx + 1
        rate = done / max(now - self._epoch_start, 1e-9)
        total = self.total_train_batches
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "  ".join(f"{k} {_number(v)}" for k, v in metrics.items())
        self.print(f"{self._epoch(trainer)}  step {done}/{total}  {shown}  {rate:.3g} it/s")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        found = {k: v for k, v in trainer.callback_metrics.items() if str(k).startswith("val/")}
        shown = "  ".join(f"{k} {_number(v)}" for k, v in sorted(found.items()))
        if trainer.state.fn != "fit":  # trainer.validate(): the model before training
            self.print(f"validated  {shown}")
            return
        spent = time.monotonic() - self._epoch_start if self._epoch_start else 0.0
        self.print(f"{self._epoch(trainer)}  validated  {shown}  ({spent:.0f} s)")


def _on_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal (a bar redraws there; elsewhere plain lines)."""
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def progress_bar(stream: IO[str] | None = None, every_s: float = 30.0) -> ProgressBar:
    """tqdm's bar when ``stream`` (default stderr) is a terminal, else :class:`LineProgress`."""
    if _on_terminal(stream or sys.stderr):
        return TQDMProgressBar()
    return LineProgress(every_s=every_s, stream=stream)


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


class _Counter:
    """Progress as plain lines: one every ``every_s`` seconds and one at :meth:`close`."""

    def __init__(
        self, total: int | None, description: str, unit: str, stream: IO[str], every_s: float
    ) -> None:
        self.total, self.description, self.unit = total, description, _plural(unit)
        self.stream, self.every_s = stream, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last < self.every_s or (self.total and self.done >= self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = f", about {(self.total - self.done) / rate:.0f} s left" if self.total else ""
        print(
            f"{self.description}: {self.done}{of} {self.unit}{share}, {rate:.3g} "
            f"{self.unit}/s{left}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        spent = time.monotonic() - self.start
        print(
            f"{self.description}: {self.done} {self.unit} in {spent:.1f} s",
            file=self.stream,
            flush=True,
        )


class _Silent:
    def update(self, count: int = 1) -> None:
        pass


@contextmanager
def progress(
    total: int | None,
    description: str,
    unit: str = "batch",
    stream: IO[str] | None = None,
    every_s: float = 30.0,
    quiet: bool = False,
) -> Iterator[Any]:
    """An object whose ``update(n)`` counts work done: tqdm's bar when ``stream`` (default
    stderr) is a terminal, else a line every ``every_s`` seconds and one at the end, e.g.
    ``embedding: 40/90 batches (44%), 6.1 batches/s, about 8 s left``; nothing when
    ``quiet``."""
    target = stream or sys.stderr
    if quiet:
        yield _Silent()
        return
    if _on_terminal(target):
        from tqdm import tqdm

        with tqdm(total=total, desc=description, unit=unit, file=target) as bar:
            yield bar
        return
    counter = _Counter(total, description, unit, target, every_s)
    yield counter
    counter.close()


def track(
    items: Iterable[T],
    total: int | None,
    description: str,
    unit: str = "batch",
    stream: IO[str] | None = None,
    every_s: float = 30.0,
) -> Iterator[T]:
    """``items``, counted by :func:`progress` as they are taken."""
    with progress(total, description, unit, stream, every_s) as bar:
        for item in items:
            yield item
            bar.update(1)


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
    for file_handler in same_file:
        root.removeHandler(file_handler)
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
        for file_handler in same_file:
            root.addHandler(file_handler)

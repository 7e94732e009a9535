"""Running a task from an entry point: in a multirun (``python train.py -m ...``), one failed job
is recorded in its run directory and the sweep goes on; in a single run the error propagates."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from retrieval.infra.checks import error_line
from retrieval.infra.hardware import keep_freed_memory
from retrieval.infra.io import atomic_write

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F")

ERROR_FILE = "error.txt"


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``), here or on a cluster."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@overload
def run_task(task: Callable[[DictConfig], T], cfg: DictConfig) -> T | None: ...
@overload
def run_task(task: Callable[[DictConfig], T], cfg: DictConfig, failed: F) -> T | F: ...
def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig, failed: Any = None) -> Any:
    """``task(cfg)``. In a multirun job, an exception is caught: its full traceback is written to
    ``<run dir>/error.txt`` (atomically) and logged, and ``failed`` is returned, so that the
    sweeper goes on with the next job. For the Optuna sweeper keep ``failed=None`` (a failed
    trial): hydra-optuna-sweeper 1.2/1.3 aborts the whole study on a NaN result.
    Outside a multirun (a single run, a test calling it) the exception propagates unchanged.
    ``KeyboardInterrupt`` and ``SystemExit`` always propagate: they stop the whole sweep.
    Freed memory is kept for reuse first (:func:`retrieval.infra.hardware.keep_freed_memory`)."""
    keep_freed_memory()
    if not in_multirun():
        return task(cfg)
    try:
        return task(cfg)
    except Exception:
        text = traceback.format_exc()
        hydra = HydraConfig.get()
        path = write_error(Path(hydra.runtime.output_dir), text)
        overrides = " ".join(hydra.overrides.task) or "no overrides"
        log.error(
            "job %s (%s) failed; the sweep goes on. Traceback in %s:\n%s",
            hydra.job.num,
            overrides,
            path,
            text,
        )
        _finish_open_wandb_run()
        return failed


#: errors that describe bad input (a missing file, a bad value, too little data) and say how
#: to fix it: in a single run, :func:`reported` prints them as one line, without a traceback
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def reported(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """``task`` that, in a single run, reports an :data:`INPUT_ERRORS` as one ``error:`` line,
    also written to the run folder's ``error.txt``, and exits with status 2
    (``HYDRA_FULL_ERROR=1`` keeps the traceback). In a multirun the
    error propagates to :func:`run_task`, which records it and goes on."""

    def run(cfg: DictConfig) -> T:
        if in_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return task(cfg)
        try:
            return task(cfg)
        except Exception as err:
            cause = _input_error(err)
            if cause is None:
                raise
            line = error_line(cause)
            print(line, file=sys.stderr, flush=True)
            run_dir = _run_dir()
            if run_dir is not None:  # the run folder says it failed, and why
                write_error(run_dir, f"{line}\n")
            _finish_open_wandb_run()
            raise SystemExit(2) from None

    return run


def _run_dir() -> Path | None:
    """The Hydra run's output folder; None outside a run (a config composed by a test)."""
    if not HydraConfig.initialized():
        return None
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # composed without a run: no runtime.output_dir
        return None


def _input_error(err: BaseException) -> BaseException | None:
    """``err`` when it is an :data:`INPUT_ERRORS`, or the one that Hydra's ``instantiate``
    wrapped (a bad backbone name raised while building the model); else None."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, INPUT_ERRORS) else None


def write_error(run_dir: Path, text: str) -> Path:
    """Write ``text`` to ``run_dir/error.txt`` (temp file, then rename); returns the path."""
    path = run_dir / ERROR_FILE
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def point_latest(run_dir: Path, name: str = "latest") -> None:
    """Make ``run_dir``'s sibling ``name`` a link to it (relative, replaced atomically), so that
    ``logs/train/runs/latest`` is the run that started last. Where links cannot be made (some
    file systems), nothing changes."""
    link = run_dir.parent / name
    partial = run_dir.parent / f".{name}.{os.getpid()}"
    try:
        partial.unlink(missing_ok=True)
        partial.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(partial, link)
    except OSError as err:
        log.warning("could not point %s at %s: %s", link, run_dir, err)
        partial.unlink(missing_ok=True)


def monitored_value(metrics: Mapping[str, Any], monitor: str) -> float:
    """What a sweep optimises: the best value of ``monitor`` the checkpoint callback saw
    (``best/<monitor>``), else its last value. KeyError when training never reported it."""
    value = metrics.get(f"best/{monitor}", metrics.get(monitor))
    if value is None:
        reported = sorted(k for k in metrics if "/" in k and not k.startswith("baseline/"))
        raise KeyError(
            f"monitor={monitor} was never reported by training; it reported {reported}. "
            "Set monitor= to one of them."
        )
    return float(value)


def _finish_open_wandb_run() -> None:
    """A job that raised mid-training leaves its W&B run open, and the next job's logger would
    log into it: mark it failed and close it."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.finish(exit_code=1)

"""Locks: a readers-writer lock between threads, and ``flock`` locks on files between
processes (POSIX only: where ``fcntl`` does not exist, the file locks lock nothing)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["LockHeldError", "ReadWriteLock", "file_lock", "folder_lock", "hold_exclusive"]


class LockHeldError(OSError):
    """Another open file handle, in this or another process, holds the lock."""


class ReadWriteLock:
    """Many readers or one writer; waiting writers go first. Not re-entrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def hold_exclusive(path: Path) -> IO[Any] | None:
    """Take an exclusive ``flock`` on ``path`` (created if missing) without waiting; it is
    held until the returned handle is closed. None where fcntl does not exist.

    Raises:
        LockHeldError: someone holds the lock (raised from the ``flock`` error).
        OSError: ``path`` cannot be opened.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    handle = open(path, "a+")  # noqa: SIM115 - held until the caller closes it
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise LockHeldError(f"{path} is locked by another holder") from err
    return handle


@contextmanager
def file_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """``flock`` on ``path`` (created if missing) for the block, waiting for it: exclusive,
    or shared with other shared holders. Without fcntl no lock; nor for a shared lock whose
    file does not exist and cannot be made (nobody can take the exclusive one then)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        handle = open(path, "a+")  # noqa: SIM115 - closed below
    except OSError:
        if exclusive or path.exists():
            raise
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        handle.close()  # releases the lock


@contextmanager
def folder_lock(folder: str | Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``folder`` (a directory) while the block runs; yields
    whether it was taken (False: another open file holds it, and ``wait`` is false). Where
    ``flock`` does not exist it yields False (the folder counts as in use). The lock moves
    with the folder when it is renamed (an export in progress keeps it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield False
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock

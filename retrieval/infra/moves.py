"""Moving files out of a folder with a journal that undoes it: nothing deleted, nothing
overwritten, nothing lost when a move fails or the process dies half-way.

:func:`move_files` moves files from under ``root`` to the same relative paths under ``dest``.
Before anything moves it refuses a ``dest`` inside ``root`` (or ``root`` inside ``dest``), a
file outside ``root``, a name that already exists under ``dest`` and, when ``dest`` is on
another file system, too little free space there. Each move is written to the journal (one
JSON line, flushed and synced) *before* it happens and confirmed after; on one file system a
move is a rename (atomic); across file systems the file is copied to a temporary name, synced,
renamed into place, and only then is the original removed. So after a crash every file is
either where it was or at its destination with a journal line naming both; a copy left whole
at both places is the same bytes twice.

:func:`undo_moves` reads a journal and moves every file back that is at its destination and
not at its origin, newest first; a file present at both places is left where it was moved
from when the two are identical (the interrupted cross-device move), and reported otherwise.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["MoveError", "MoveReport", "move_files", "undo_moves"]

JOURNAL_FORMAT = "retrieval-moves"
_PARTIAL = ".retrieval-partial"


class MoveError(OSError):
    """A move refused before it started, or stopped part-way (the message says which)."""


@dataclass
class MoveReport:
    """Files moved (``(origin, destination)``) and problems met (one line each)."""

    moved: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _plan(paths: Sequence[str | Path], root: Path, dest: Path) -> list[tuple[Path, Path]]:
    """``(origin, destination)`` of every file, checked before anything moves."""
    if _inside(dest, root) or _inside(root, dest):
        raise MoveError(f"--move-to {dest} must lie outside the folder {root}")
    plan = []
    for path in paths:
        origin = Path(path).resolve()
        if not _inside(origin, root) or origin == root:
            raise MoveError(f"{origin} is not under {root}: nothing moved")
        if not origin.is_file():
            raise MoveError(f"{origin} is not a file: nothing moved")
        target = dest / origin.relative_to(root)
        if target.exists() or target.is_symlink():
            raise MoveError(
                f"{target} already exists: nothing moved (a name clash is never "
                "overwritten; pick another --move-to folder)"
            )
        plan.append((origin, target))
    return plan


def _check_space(plan: list[tuple[Path, Path]], root: Path, dest: Path) -> None:
    """Refuse a cross-device move that would not fit on ``dest``'s file system."""
    probe = dest
    while not probe.exists():
        probe = probe.parent
    if os.stat(probe).st_dev == os.stat(root).st_dev:
        return
    needed = sum(origin.stat().st_size for origin, _ in plan)
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise MoveError(
            f"--move-to {dest}: {needed} bytes to move but {free} free there: nothing moved"
        )


def _write(journal: IO[str], record: dict[str, Any]) -> None:
    journal.write(json.dumps(record) + "\n")
    journal.flush()
    os.fsync(journal.fileno())


def _move_one(origin: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(origin, target)
        return
    except OSError as err:
        if err.errno != 18:  # EXDEV: another file system; anything else is a real failure
            raise
    partial = target.with_name(target.name + _PARTIAL)
    try:
        shutil.copy2(origin, partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(partial, target)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    origin.unlink()


def move_files(
    paths: Sequence[str | Path], root: str | Path, dest: str | Path, journal: str | Path
) -> MoveReport:
    """Move ``paths`` (files under ``root``) to ``dest`` keeping their paths relative to
    ``root``, recording each move in the new file ``journal`` (see the module's description).

    Raises:
        MoveError: a check failed (nothing moved), or a move failed part-way (the files moved
            before it are in the journal, the failing one is back where it was).
    """
    root, dest = Path(root).resolve(), Path(dest).resolve()
    plan = _plan(paths, root, dest)
    _check_space(plan, root, dest)
    journal = Path(journal)
    if journal.exists():
        raise MoveError(f"{journal} already exists: nothing moved")
    report = MoveReport()
    journal.parent.mkdir(parents=True, exist_ok=True)
    with open(journal, "x", encoding="utf-8") as out:
        _write(out, {"format": JOURNAL_FORMAT, "version": 1, "root": str(root), "dest": str(dest)})
        for origin, target in plan:
            _write(out, {"move": str(origin), "to": str(target)})
            try:
                _move_one(origin, target)
            except OSError as err:
                raise MoveError(
                    f"moving {origin} failed ({err}); {len(report.moved)} file(s) moved "
                    f"before it, recorded in {journal} (undo with --undo {journal})"
                ) from err
            _write(out, {"done": str(target)})
            report.moved.append((str(origin), str(target)))
    return report


def _read_journal(journal: Path) -> list[tuple[Path, Path]]:
    """The moves a journal records (done or only planned), in the order written."""
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoveError(f"{journal} is not a move journal: {err}") from err
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        raise MoveError(f"{journal} is not a move journal written by `retrieval duplicates`")
    moves = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a line cut short by a crash: its move never started
                break
            raise MoveError(f"{journal}, line {number}: not JSON") from None
        if "move" in record:
            moves.append((Path(record["move"]), Path(record["to"])))
    return moves


def undo_moves(journal: str | Path) -> MoveReport:
    """Move back every file a journal records (see the module's description)."""
    journal = Path(journal)
    report = MoveReport()
    for origin, target in reversed(_read_journal(journal)):
        partial = target.with_name(target.name + _PARTIAL)
        partial.unlink(missing_ok=True)  # a copy that never completed
        if not target.exists():
            continue  # never moved (or already restored)
        if origin.exists():
            if filecmp.cmp(origin, target, shallow=False):
                target.unlink()  # an interrupted cross-device move: the origin is whole
            else:
                report.problems.append(f"{origin} exists and differs from {target}: left both")
            continue
        try:
            _move_one(target, origin)
        except OSError as err:
            report.problems.append(f"{target} could not be moved back to {origin}: {err}")
            continue
        report.moved.append((str(target), str(origin)))
    return report

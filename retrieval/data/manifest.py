"""Manifest CSV files: ``path,label,split`` (required), ``is_query,is_gallery`` (optional, both
or neither) and any extra columns (kept in ``ManifestRow.extra``). Format: data/README.md."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.infra.io import atomic_write

SPLITS = ("train", "val", "test")
REQUIRED = ("path", "label", "split")
FLAGS = ("is_query", "is_gallery")
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class ManifestError(ValueError):
    """A manifest (or a dataset layout being converted to one) is missing or malformed."""


@dataclass(frozen=True)
class ManifestRow:
    """One image: absolute ``path``, ``label`` (identity), ``split`` and optional flags.

    ``is_query``/``is_gallery`` are ``None`` when the manifest has no such columns; ``extra``
    holds the other columns by name (e.g. ``{"category": "bicycle"}``).
    """

    path: Path
    label: str
    split: str
    is_query: bool | None = None
    is_gallery: bool | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def _parse_bool(value: str, where: str, column: str) -> bool:
    """Parse 0/1, true/false, yes/no (case-insensitive); anything else, empty included, fails."""
    parsed = _BOOLS.get(value.strip().lower())
    if parsed is None:
        raise ManifestError(
            f"{where}, column '{column}': {value!r} is not a boolean; use 1/0, true/false or yes/no"
        )
    return parsed


def _check_header(header: list[str], name: Path) -> None:
    """Reject unnamed, duplicate or missing required columns, and half the query/gallery pair."""
    at = f"{name}, row 1 (header)"
    if "" in header:
        raise ManifestError(f"{at}: column {header.index('') + 1} has no name; name or remove it")
    if dupes := sorted(c for c, n in Counter(header).items() if n > 1):
        raise ManifestError(f"{at}: duplicate column(s) {dupes}; keep one of each")
    if missing := [c for c in REQUIRED if c not in header]:
        raise ManifestError(
            f"{at}: missing required column(s) {missing} (found {header}); add them"
        )
    if (FLAGS[0] in header) != (FLAGS[1] in header):
        found, lacking = FLAGS if FLAGS[0] in header else FLAGS[::-1]
        raise ManifestError(f"{at}: column '{found}' without '{lacking}'; add both or neither")


def _parse_row(
    values: dict[str, str], where: str, root: Path, has_flags: bool, extras: list[str]
) -> ManifestRow:
    """Validate one data row (values already stripped) and build its ManifestRow."""
    for column in ("path", "label"):
        if not values[column]:
            raise ManifestError(f"{where}, column '{column}': empty {column}; every row needs one")
    if (split := values["split"]) not in SPLITS:
        raise ManifestError(
            f"{where}, column 'split': unknown split {split!r}; allowed: {', '.join(SPLITS)}"
        )
    path = Path(values["path"]).expanduser()
    flags = [_parse_bool(values[c], where, c) for c in FLAGS] if has_flags else [None, None]
    return ManifestRow(
        path=path if path.is_absolute() else root / path,
        label=values["label"],
        split=split,
        is_query=flags[0],
        is_gallery=flags[1],
        extra={c: values[c] for c in extras},
    )


def _check_files(name: Path, numbered: list[tuple[int, ManifestRow]]) -> None:
    """One error counting the missing image files and naming the first 5 with row numbers."""
    missing = [(n, r.path) for n, r in numbered if not r.path.is_file()]
    if missing:
        listed = "; ".join(f"row {n}: {p}" for n, p in missing[:5])
        raise ManifestError(
            f"{name}: {len(missing)} of {len(numbered)} image files do not exist (column 'path'), "
            f"first {min(len(missing), 5)}: {listed}. Check the image root or fix the paths"
        )


def read_manifest(
    path: str | Path, root: str | Path | None = None, check_files: bool = True
) -> list[ManifestRow]:
    """Read and validate a manifest CSV; relative paths are resolved against ``root``.

    ``root`` defaults to the manifest's directory. Row numbers in errors are 1-based with the
    header as row 1 (for a record that spans lines, the line it starts on). Blank lines are
    skipped; cells are stripped of surrounding whitespace; a UTF-8 byte-order mark is accepted.
    Raises ManifestError for: a missing or non-UTF-8 file, an empty file, a header without data
    rows, a bad header (unnamed / duplicate / missing required / one of is_query, is_gallery),
    a row with the wrong number of cells, an empty path or label, an unknown split, a bad
    boolean, and (with ``check_files``) image files that do not exist (one error for all).
    """
    name = Path(path)
    if not name.is_file():
        raise ManifestError(f"{name}: manifest file does not exist (or is not a file)")
    base = (Path(root).expanduser() if root is not None else name.parent).resolve()
    try:
        with open(name, encoding="utf-8-sig", newline="") as handle:
            records = _read_records(handle, name)
    except UnicodeDecodeError as err:
        raise ManifestError(f"{name}: not UTF-8 text ({err}); save it as UTF-8 CSV") from None
    if not records:
        raise ManifestError(f"{name}: file is empty; it needs a header 'path,label,split' and rows")
    header = [c.strip() for c in records[0][1]]
    _check_header(header, name)
    if len(records) == 1:
        raise ManifestError(f"{name}: has a header but no data rows; add one row per image")
    has_flags = FLAGS[0] in header
    extras = [c for c in header if c not in REQUIRED and c not in FLAGS]
    numbered: list[tuple[int, ManifestRow]] = []
    for number, cells in records[1:]:
        where = f"{name}, row {number}"
        if len(cells) != len(header):
            raise ManifestError(
                f"{where}: has {len(cells)} cells but the header has {len(header)} columns "
                f"({','.join(header)}); quote values that contain commas"
            )
        values = {c: v.strip() for c, v in zip(header, cells, strict=True)}
        numbered.append((number, _parse_row(values, where, base, has_flags, extras)))
    if check_files:
        _check_files(name, numbered)
    return [row for _, row in numbered]


def _read_records(handle: Iterable[str], name: Path) -> list[tuple[int, list[str]]]:
    """Non-blank CSV records with the file line each starts on."""
    reader = csv.reader(handle)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as err:
        raise ManifestError(f"{name}, row {start}: not valid CSV ({err})") from None
    return records


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (as given or symlink-resolved) with '/' separators if it
    is under it; otherwise the absolute path. A relative ``path`` is returned unchanged."""
    if not path.is_absolute():
        return path.as_posix()
    absolute = Path(os.path.abspath(path))
    for base in (root, root.resolve()):
        if absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix()
    return absolute.as_posix()


def write_manifest(
    rows: Iterable[ManifestRow], path: str | Path, root: str | Path | None = None
) -> Path:
    """Write ``rows`` to ``path`` atomically and return ``path``.

    Paths under ``root`` (default: the manifest's directory) are written relative to it with '/'
    separators, others absolute; a relative ``ManifestRow.path`` is written as is. Columns:
    path,label,split, then is_query,is_gallery (as 1/0) only if any row has them, then the union
    of extra columns sorted by name (empty where a row lacks one). Raises ManifestError (nothing
    written) for an empty label, an unknown split, a row missing a flag that others have,
    or an extra column that reuses a standard column name. Parent folders are created.
    """
    out = Path(path)
    base = Path(os.path.abspath(Path(root).expanduser() if root is not None else out.parent))
    items = list(rows)
    has_flags = any(r.is_query is not None or r.is_gallery is not None for r in items)
    extras = sorted({k for r in items for k in r.extra})
    clash = [c for c in extras if c in REQUIRED or c in FLAGS]
    if clash:
        raise ManifestError(f"{out}: extra column(s) {clash} reuse standard column names")
    header = [*REQUIRED, *(FLAGS if has_flags else ()), *extras]
    lines: list[list[str]] = [header]
    for index, row in enumerate(items):
        where = f"{out}: row {index + 2}"
        if not row.label or row.split not in SPLITS:
            raise ManifestError(
                f"{where}: needs a non-empty label and a split in {SPLITS}; got "
                f"label={row.label!r}, split={row.split!r}"
            )
        cells = [_relative(row.path, base), row.label, row.split]
        if has_flags:
            if row.is_query is None or row.is_gallery is None:
                raise ManifestError(f"{where}: is_query/is_gallery unset while other rows set them")
            cells += [str(int(row.is_query)), str(int(row.is_gallery))]
        lines.append(cells + [row.extra.get(c, "") for c in extras])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    _atomic_write_text(out, buffer.getvalue())
    return out


def select_split(
    rows: Sequence[ManifestRow], split: str, manifest_name: str = "manifest"
) -> list[ManifestRow]:
    """Rows whose split is ``split``, in order.

    Raises ManifestError for a split name not in SPLITS, or when no row has that split (naming
    the manifest and the splits present with their row counts).
    """
    if split not in SPLITS:
        raise ManifestError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    chosen = [r for r in rows if r.split == split]
    if not chosen:
        counts = Counter(r.split for r in rows)
        present = ", ".join(f"{s} ({counts[s]} rows)" for s in SPLITS if counts[s]) or "none"
        raise ManifestError(
            f"{manifest_name}: no rows with split '{split}'; splits present: {present}. "
            f"Add '{split}' rows (column 'split') or use another split"
        )
    return chosen


def has_match(rows: Sequence[ManifestRow]) -> bool:
    """Whether some query among ``rows`` has an item of its label to find, under the protocol
    the flags give (:func:`retrieval.evaluation.evaluate_protocol`): without flags every row
    searches the others (leave-one-out, a label needs 2 rows); with them queries search the
    gallery rows."""
    queries = Counter(r.label for r in rows if r.is_query is not False)
    gallery = Counter(r.label for r in rows if r.is_gallery is not False)
    if all(r.is_query is not False and r.is_gallery is not False for r in rows):
        return any(count >= 2 for count in queries.values())
    return any(label in gallery for label in queries)


LABEL_MODES = ("folder", "none")


def folder_labels(paths: Sequence[Path], root: Path, labels: str) -> list[str | None]:
    """Each image's label under the ``labels`` option every entry point shares.

    ``labels="folder"``: an image's label is its folder's path under ``root`` (``None`` for an
    image directly in ``root``); ``labels="none"``: every label is ``None``.

    >>> folder_labels([Path("/g/cat/1.jpg"), Path("/g/2.jpg")], Path("/g"), "folder")
    ['cat', None]

    Raises:
        ValueError: ``labels`` is neither "folder" nor "none".
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be 'folder' or 'none', got {labels!r}")
    if labels == "none":
        return [None] * len(paths)
    names = [Path(p).parent.relative_to(root).as_posix() for p in paths]
    return [None if name == "." else name for name in names]

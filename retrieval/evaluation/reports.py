"""The visual and tabular parts of an evaluation report, as plain functions: ``results_grid``
(queries beside their ranked results, framed green/red by label), ``per_label_table`` and
``write_csv`` (labels worst first), ``text_table``, ``choose_queries``. Writes are atomic."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from retrieval.data.images import DEFAULT_MAX_PIXELS, open_rgb
from retrieval.infra.io import atomic_write

GREEN, RED, BLUE, GREY = (0, 160, 60), (215, 40, 40), (40, 90, 200), (150, 150, 150)
_WHITE, _LETTERBOX, _PLACEHOLDER, _TEXT = (255,) * 3, (235,) * 3, (190,) * 3, (30,) * 3
_LEGENDS = (
    "results by rank (green = same label as the query, red = other label)",
    "results (green = same label, red = other)",
    "green = same, red = other",
)
_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class GridLayout:
    """Pixel geometry of ``results_grid``: a header line, then one row of cells per query.

    Column 0 is the query, columns 1..k its results (two gaps and a rule further right); a cell
    is a framed square of side ``box = thumb_size + 2 * frame`` with two text lines under it.
    """

    def __init__(self, thumb_size: int) -> None:
        self.thumb_size = thumb_size
        self.frame = max(3, round(thumb_size / 32))
        self.font_size = max(12, round(thumb_size / 10))
        self.line = self.font_size + 4
        self.gap = max(8, thumb_size // 12)
        self.box = thumb_size + 2 * self.frame
        self.pitch_x = self.box + self.gap
        self.pitch_y = self.box + 2 * self.line + 2 * self.gap

    def frame_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Inclusive (x0, y0, x1, y1) of the frame of cell (row, col)."""
        x = self.gap + col * self.pitch_x + (2 * self.gap if col > 0 else 0)
        y = 2 * self.gap + self.line + row * self.pitch_y
        return x, y, x + self.box - 1, y + self.box - 1

    def size(self, n: int, k: int) -> tuple[int, int]:
        """(width, height) of the grid for ``n`` queries with ``k`` results each."""
        return self.frame_box(0, k)[0] + self.pitch_x, self.frame_box(n, 0)[1]


def _fit(text: str, font: _Font, width: int) -> str:
    """``text`` shortened with '...' so that it is at most ``width`` px wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _thumbnail(path: object, size: int, max_pixels: int, font: _Font) -> Image.Image:
    """``path`` letterboxed into a ``size`` square; a grey "no result" square for None or "",
    a grey "unreadable" one for an image that cannot be loaded."""
    cell, missing = Image.new("RGB", (size, size), _LETTERBOX), path is None or str(path) == ""
    try:
        if missing:
            raise ValueError("no result")
        image = ImageOps.contain(open_rgb(str(path), max_pixels), (size, size))
        cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    except (OSError, ValueError):  # ImageLoadError is an OSError
        cell.paste(_PLACEHOLDER, (0, 0, size, size))
        text = "no result" if missing else "unreadable"
        ImageDraw.Draw(cell).text((size / 2, size / 2), text, fill=_TEXT, font=font, anchor="mm")
    return cell


def _as_array(values: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``values`` as an object array of ``shape``; ValueError naming ``name`` otherwise."""
    try:
        array = np.asarray(values, dtype=object)
    except ValueError:  # ragged nested lists
        array = np.empty(0)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, not {array.shape}")
    return array


def results_grid(
    query_paths: Sequence[str | Path] | np.ndarray,
    query_labels: Sequence[Any] | np.ndarray,
    result_paths: Sequence[Sequence[str | Path]] | np.ndarray,
    result_labels: Sequence[Sequence[Any]] | np.ndarray,
    result_scores: Sequence[Sequence[float]] | np.ndarray,
    thumb_size: int = 128,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """One row per query: the query (blue frame), then its k results in rank order.

    Shapes: ``query_paths``, ``query_labels`` (n,); ``result_paths``, ``result_labels``,
    ``result_scores`` (n, k). A result is framed green when its label equals the query's label,
    red otherwise; under it: rank and score (3 decimals), then the label. Labels may be str or
    int. A result path that is None or "" is drawn as "no result" (grey frame); an image that
    cannot be loaded as a grey "unreadable" placeholder. Geometry: ``GridLayout(thumb_size)``.
    Raises ValueError for n == 0, thumb_size < 16 or inconsistent shapes.
    """
    scores = np.asarray(result_scores, dtype=np.float64)
    n, k = len(query_paths), (scores.shape[1] if scores.ndim == 2 else 0)
    if n == 0 or thumb_size < 16:
        raise ValueError(f"need >= 1 query and thumb_size >= 16, not {n}, {thumb_size}")
    queries = _as_array(query_paths, (n,), "query_paths")
    q_labels = _as_array(query_labels, (n,), "query_labels")
    paths = _as_array(result_paths, (n, k), "result_paths")
    labels = _as_array(result_labels, (n, k), "result_labels")
    _as_array(scores, (n, k), "result_scores")
    layout = GridLayout(thumb_size)
    font = ImageFont.load_default(size=layout.font_size)  # Pillow >= 10.1
    canvas = Image.new("RGB", layout.size(n, k), _WHITE)
    draw, gap = ImageDraw.Draw(canvas), layout.gap

    def write(xy: tuple[int, int], text: str, width: int) -> None:
        draw.text(xy, _fit(text, font, width), fill=_TEXT, font=font)

    def cell(row: int, col: int, path: object, color: tuple[int, ...], lines: list[str]) -> None:
        x0, y0, x1, y1 = layout.frame_box(row, col)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=layout.frame)
        thumb = _thumbnail(path, thumb_size, max_pixels, font)
        canvas.paste(thumb, (x0 + layout.frame, y0 + layout.frame))
        for index, line in enumerate(lines):
            write((x0, y1 + 4 + index * layout.line), line, layout.box)

    write((gap, gap), "query", layout.box)
    if k:
        x = layout.frame_box(0, 1)[0]
        fits = [t for t in _LEGENDS if font.getlength(t) <= canvas.width - gap - x]
        write((x, gap), (fits or _LEGENDS[-1:])[0], canvas.width - gap - x)
        draw.line((x - gap - 1, gap, x - gap - 1, canvas.height - gap), fill=GREY, width=2)
    for i in range(n):
        cell(i, 0, queries[i], BLUE, ["query", str(q_labels[i])])
        for j in range(k):
            missing = paths[i, j] is None or str(paths[i, j]) == ""
            color = GREY if missing else GREEN if bool(labels[i, j] == q_labels[i]) else RED
            cell(i, j + 1, paths[i, j], color, [f"#{j + 1}  {scores[i, j]:.3f}", str(labels[i, j])])
    return canvas


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as PNG to ``path`` atomically (temp file beside it, then os.replace)."""
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers ascending, then strings, then NaN; never compares a number with a string."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return (2, 0.0) if math.isnan(value) else (0, float(value))
    return (1, str(value))


def per_label_table(
    query_labels: Sequence[Any] | np.ndarray, per_query: Mapping[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Mean of each per-query metric by query label, worst label first.

    ``query_labels`` (n,); each ``per_query`` value (n,). Returns one row per label:
    ``{"label", "queries", <metric>: mean, ...}`` with metrics in ``per_query`` order. NaN
    values (an undefined metric) are left out of a mean; a label with none gives NaN. Rows are
    sorted by the first metric, then the second (ascending, NaN last), then the label.
    """
    raw = np.asarray(query_labels, dtype=object)
    labels = [x.item() if isinstance(x, np.generic) else x for x in raw]
    slots: dict[Any, int] = {}
    inverse = np.array([slots.setdefault(x, len(slots)) for x in labels], dtype=np.int64)
    counts = np.bincount(inverse, minlength=len(slots))
    rows = [{"label": label, "queries": int(c)} for label, c in zip(slots, counts, strict=True)]
    for name, values in per_query.items():
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (len(labels),):
            raise ValueError(f"per_query[{name!r}] has shape {array.shape}, not ({len(labels)},)")
        finite = ~np.isnan(array)
        total = np.bincount(inverse, weights=np.where(finite, array, 0.0), minlength=len(slots))
        used = np.bincount(inverse, weights=finite.astype(np.float64), minlength=len(slots))
        with np.errstate(invalid="ignore", divide="ignore"):
            for row, mean in zip(rows, total / used, strict=True):
                row[name] = float(mean)
    keys = [*list(per_query)[:2], "label"]
    return sorted(rows, key=lambda row: [_sort_key(row[key]) for key in keys])


def _plain(value: Any, decimals: int) -> Any:
    """A float as text with ``decimals`` decimals; a numpy scalar as the Python one."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{decimals}f}"
    return value.item() if isinstance(value, np.generic) else value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``rows`` to ``path`` atomically; the header is the keys in order of first appearance
    (a missing key gives an empty cell); floats get 6 decimals. Raises ValueError for no rows."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: _plain(value, 6) for key, value in row.items()} for row in rows)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], decimals: int = 4) -> str:
    """The one printed table: the first column left-aligned, the others right-aligned, each as
    wide as its widest cell; floats with ``decimals`` decimals, ``None`` as ``-``, text as given
    (so a caller formats a special cell itself).

    >>> print(text_table(["metric", "value"], [["recall@1", 0.81234], ["queries", 1200]]))
    metric     value
    recall@1  0.8123
    queries     1200
    """
    cells = [
        [str(c) for c in header],
        *([("-" if v is None else str(_plain(v, decimals))) for v in row] for row in rows),
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


def choose_queries(
    num_queries: int, n: int, seed: int, hits_at_1: np.ndarray | None = None
) -> np.ndarray:
    """Indices (int64, at most ``min(num_queries, n)``) of the queries to draw; same seed, same
    choice. With ``hits_at_1`` (n,) (bool, or 0/1 recall@1 per query; NaN counts as a miss)
    about half are failures when there are enough, the rest successes, topped up from the
    other group when one runs short; failures come first, each group in index order."""
    if num_queries < 0 or n < 0:
        raise ValueError(f"num_queries and n must be >= 0, got {num_queries} and {n}")
    rng, m = np.random.default_rng(seed), min(num_queries, n)
    if hits_at_1 is None:
        return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
    hits = np.asarray(hits_at_1, dtype=np.float64)
    if hits.shape != (n,):
        raise ValueError(f"hits_at_1 has shape {hits.shape}, expected ({n},)")
    failures, successes = np.flatnonzero(~(hits >= 0.5)), np.flatnonzero(hits >= 0.5)
    n_fail = min(len(failures), max(m - len(successes), (m + 1) // 2))
    picked = [rng.choice(failures, n_fail, replace=False), rng.choice(successes, m - n_fail, False)]
    return np.concatenate([np.sort(p) for p in picked]).astype(np.int64)

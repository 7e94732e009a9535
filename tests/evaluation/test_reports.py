"""Tests of retrieval.evaluation.reports: the results grid, per-label tables, CSV, atomic writes."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.evaluation import reports
from retrieval.evaluation.reports import (
    BLUE,
    GREEN,
    GREY,
    RED,
    GridLayout,
    choose_queries,
    per_label_table,
    results_grid,
    save_png,
    text_table,
    write_csv,
)

FILL = (20, 110, 220)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    """A square, a wide and a corrupt image file, and a missing path."""
    Image.new("RGB", (50, 50), FILL).save(tmp_path / "square.png")
    Image.new("RGB", (200, 40), FILL).save(tmp_path / "wide.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    names = ["square.png", "wide.jpg", "corrupt.jpg", "missing.png"]
    return {name.split(".")[0]: str(tmp_path / name) for name in names}


def _frame_pixel(image: Image.Image, layout: GridLayout, row: int, col: int) -> tuple[int, ...]:
    """A pixel on the left edge of the frame of cell (row, col), half way down."""
    x0, y0, _, y1 = layout.frame_box(row, col)
    return image.getpixel((x0 + 1, (y0 + y1) // 2))  # type: ignore[return-value]


def _thumb_pixel(image: Image.Image, layout: GridLayout, row: int, col: int) -> tuple[int, ...]:
    """A pixel just inside the top-left corner of the thumbnail of cell (row, col)."""
    x0, y0, _, _ = layout.frame_box(row, col)
    return image.getpixel((x0 + layout.frame + 2, y0 + layout.frame + 2))  # type: ignore[return-value]


@pytest.mark.parametrize(("n", "k", "thumb"), [(2, 3, 64), (3, 5, 128), (1, 0, 32)])
def test_grid_has_n_rows_of_k_plus_one_cells(images: dict[str, str], n: int, k: int, thumb: int):
    sq = images["square"]
    grid = results_grid(
        [sq] * n, ["a"] * n, [[sq] * k] * n, [["a"] * k] * n, np.zeros((n, k)), thumb_size=thumb
    )
    layout = GridLayout(thumb)
    header = 2 * layout.gap + layout.line
    assert grid.size == (
        layout.gap + (k + 1) * layout.pitch_x + (2 * layout.gap if k else 0),
        header + n * layout.pitch_y,
    )
    assert layout.box == thumb + 2 * layout.frame and layout.pitch_x > layout.box
    x1, y1 = layout.frame_box(n - 1, k)[2:]
    assert x1 < grid.width and y1 + 2 * layout.line < grid.height  # the last cell and its text fit


def test_frames_are_blue_green_red_by_label(images: dict[str, str]):
    sq = images["square"]
    grid = results_grid(
        [sq, sq],
        ["cat", 7],
        [[sq, sq, sq], [sq, sq, sq]],
        [["cat", "dog", "cat"], [np.int64(7), 8, "7"]],  # "7" is not the int 7
        [[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]],
        thumb_size=64,
    )
    layout = GridLayout(64)
    expected = [[BLUE, GREEN, RED, GREEN], [BLUE, GREEN, RED, RED]]
    for row, colors in enumerate(expected):
        for col, color in enumerate(colors):
            assert _frame_pixel(grid, layout, row, col) == color, (row, col)
            assert _thumb_pixel(grid, layout, row, col) == FILL  # the image itself


def test_thumbnails_keep_aspect_ratio(images: dict[str, str]):
    grid = results_grid([images["wide"]], ["a"], [[]], [[]], np.zeros((1, 0)), thumb_size=64)
    layout = GridLayout(64)
    x0, y0, x1, y1 = layout.frame_box(0, 0)
    middle = grid.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
    assert max(abs(a - b) for a, b in zip(middle, FILL, strict=True)) < 12  # JPEG
    assert _thumb_pixel(grid, layout, 0, 0) == reports._LETTERBOX  # 200x40 leaves bars


def test_unreadable_and_missing_images_become_placeholders(images: dict[str, str]):
    grid = results_grid(
        [images["missing"]],
        ["a"],
        [[images["corrupt"], images["missing"], None, images["square"]]],
        [["a", "b", "a", "a"]],
        [[0.5, 0.4, 0.3, 0.2]],
        thumb_size=64,
    )
    layout = GridLayout(64)
    for col in range(4):
        assert _thumb_pixel(grid, layout, 0, col) == reports._PLACEHOLDER
    assert _thumb_pixel(grid, layout, 0, 4) == FILL
    frames = [_frame_pixel(grid, layout, 0, col) for col in range(5)]
    assert frames == [BLUE, GREEN, RED, GREY, GREEN]


def test_grid_rejects_inconsistent_shapes(images: dict[str, str]):
    sq = images["square"]
    with pytest.raises(ValueError, match="result_labels"):
        results_grid([sq], ["a"], [[sq, sq]], [["a"]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="query_labels"):
        results_grid([sq], ["a", "b"], [[sq]], [["a"]], [[0.1]])


def _naive_table(labels: list, per_query: dict[str, np.ndarray]) -> dict:
    table: dict = {}
    for label in set(labels):
        members = [i for i, x in enumerate(labels) if x == label]
        row = {"queries": len(members)}
        for name, values in per_query.items():
            finite = [values[i] for i in members if not math.isnan(values[i])]
            row[name] = sum(finite) / len(finite) if finite else math.nan
        table[label] = row
    return table


def test_per_label_table_matches_a_naive_loop_and_puts_the_worst_first():
    rng = np.random.default_rng(0)
    labels = [f"l{x}" for x in rng.integers(0, 12, size=300)]
    per_query = {"recall@1": rng.integers(0, 2, 300).astype(float), "map@r": rng.random(300)}
    per_query["map@r"][:20] = np.nan
    rows = per_label_table(np.array(labels), per_query)
    naive = _naive_table(labels, per_query)
    assert sorted(row["label"] for row in rows) == sorted(naive)
    for row in rows:
        assert row["queries"] == naive[row["label"]]["queries"]
        for name in per_query:
            assert row[name] == pytest.approx(naive[row["label"]][name], nan_ok=True)
    keys = [(row["recall@1"], row["map@r"], row["label"]) for row in rows]
    assert keys == sorted(keys)
    worst = min(naive, key=lambda x: (naive[x]["recall@1"], naive[x]["map@r"], x))
    assert rows[0]["label"] == worst


def test_per_label_table_ties_numbers_and_nan():
    rows = per_label_table(
        [10, 2, 2, 10, 3],
        {
            "recall@1": np.array([0.0, 0.0, 1.0, 1.0, 0.5]),
            "map@r": np.array([0.2, 0.6, 0.2, 0.6, np.nan]),
        },
    )
    # 2 and 10 tie on recall@1 (0.5) and map@r (0.4); label order is numeric, NaN last
    assert [row["label"] for row in rows] == [2, 10, 3]
    assert rows[0] == {"label": 2, "queries": 2, "recall@1": 0.5, "map@r": pytest.approx(0.4)}
    mixed = per_label_table(np.array(["b", 1, "a", 1], dtype=object), {"x": np.ones(4)})
    assert [row["label"] for row in mixed] == [1, "a", "b"]  # numbers first, types kept


def test_csv_round_trips(tmp_path: Path):
    rows = [
        {"label": "obj_1", "queries": 3, "recall@1": 1 / 3, "map@r": np.float32(0.25)},
        {"label": 7, "queries": np.int64(2), "recall@1": 0.5, "map@r": 1.0},
    ]
    path = tmp_path / "sub" / "per_label.csv"
    write_csv(rows, path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["label", "queries", "recall@1", "map@r"]
        back = list(reader)
    assert back[0] == {
        "label": "obj_1",
        "queries": "3",
        "recall@1": "0.333333",
        "map@r": "0.250000",
    }
    assert back[1] == {"label": "7", "queries": "2", "recall@1": "0.500000", "map@r": "1.000000"}
    with pytest.raises(ValueError, match="no rows"):
        write_csv([], path)


def test_atomic_writes_keep_the_old_file_and_leave_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    png, table = tmp_path / "grid.png", tmp_path / "table.csv"
    save_png(Image.new("RGB", (4, 4), RED), png)
    write_csv([{"label": "a", "x": 1.0}], table)
    old = {png: png.read_bytes(), table: table.read_bytes()}

    def broken_save(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (4, 4), GREEN), png)
    monkeypatch.undo()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_csv([{"label": "b", "x": 2.0}], table)
    with pytest.raises(OSError, match="rename failed"):
        save_png(Image.new("RGB", (4, 4), GREEN), png)
    monkeypatch.undo()
    assert {path: path.read_bytes() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "table.csv"]
    save_png(Image.new("RGB", (4, 4), GREEN), png)  # and a working write replaces the file
    assert Image.open(png).getpixel((0, 0)) == GREEN


def test_text_table_aligns_names_and_values():
    rows = [["test/recall@1", 0.81234, None], ["test/map@r", 0.5, 0.25], ["queries", 1200, "12.5"]]
    text = text_table(["metric", "value", "exact"], rows)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "value", "exact"]
    assert "test/recall@1  0.8123" in text and "0.5000" in text
    assert lines[1].split() == ["test/recall@1", "0.8123", "-"]
    assert lines[-1].split() == ["queries", "1200", "12.5"]
    assert len({len(line) for line in lines}) == 1  # right-aligned values: all lines as wide


def test_choose_queries_is_deterministic_and_mixes_failures():
    first, again = choose_queries(8, 100, seed=3), choose_queries(8, 100, seed=3)
    assert np.array_equal(first, again) and len(set(first.tolist())) == 8
    assert not np.array_equal(first, choose_queries(8, 100, seed=4))
    assert np.array_equal(choose_queries(50, 5, seed=0), np.arange(5))
    hits = np.ones(100, dtype=bool)
    hits[::10] = False  # 10 failures, 90 successes
    picked = choose_queries(8, 100, seed=0, hits_at_1=hits)
    assert np.array_equal(picked, choose_queries(8, 100, seed=0, hits_at_1=hits))
    assert len(set(picked.tolist())) == 8
    assert (~hits[picked]).sum() == 4 and not hits[picked[:4]].any()  # failures first
    few = np.ones(100)
    few[[5, 17]] = 0.0
    picked = choose_queries(8, 100, seed=1, hits_at_1=few)
    assert len(picked) == 8 and sorted(picked[:2].tolist()) == [5, 17]
    all_fail = choose_queries(6, 10, seed=1, hits_at_1=np.zeros(10))
    assert len(all_fail) == 6

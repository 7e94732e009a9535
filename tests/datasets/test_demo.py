"""Tests for the generated demo dataset (small configurations, seconds in total)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.datasets import demo
from retrieval.datasets.demo import DEMO_VERSION, prepare_demo, render_demo_image

SMALL = {"num_labels": 6, "images_per_label": 3, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def test_layout_and_manifest(small_demo: Path) -> None:
    root = small_demo.parent
    assert small_demo == root / "manifest.csv"
    assert small_demo.read_text(encoding="utf-8").splitlines()[0] == "path,label,split"
    rows = _rows(small_demo)
    assert len(rows) == 18
    labels = sorted({r["label"] for r in rows})
    assert labels == [f"obj_{i:03d}" for i in range(6)]
    for row in rows:
        assert "\\" not in row["path"] and row["path"].startswith(f"images/{row['label']}/")
        with Image.open(root / row["path"]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
    for label in labels:
        assert sum(r["label"] == label for r in rows) == 3
    train = {r["label"] for r in rows if r["split"] == "train"}
    test = {r["label"] for r in rows if r["split"] == "test"}
    assert {r["split"] for r in rows} == {"train", "test"}
    assert train == set(labels[:3]) and test == set(labels[3:])
    params = json.loads((root / "demo.json").read_text(encoding="utf-8"))
    assert params == {"version": DEMO_VERSION, "seed": 0, **SMALL}
    assert sorted(p.name for p in root.parent.iterdir()) == ["data"]  # no temporary folders


def test_deterministic_bytes(small_demo: Path, tmp_path: Path) -> None:
    other = prepare_demo(tmp_path / "again", **SMALL)
    assert _files(other.parent) == _files(small_demo.parent)


def test_seed_changes_images(small_demo: Path, tmp_path: Path) -> None:
    other = prepare_demo(tmp_path / "seeded", seed=1, **SMALL)
    first, second = _files(small_demo.parent), _files(other.parent)
    assert first["manifest.csv"] == second["manifest.csv"]
    assert first["images/obj_000/000.jpg"] != second["images/obj_000/000.jpg"]


def test_images_differ_within_label(small_demo: Path) -> None:
    root = small_demo.parent
    for label in range(6):
        arrays = [
            np.asarray(Image.open(root / f"images/obj_{label:03d}/{i:03d}.jpg"), dtype=np.float32)
            for i in range(3)
        ]
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.abs(arrays[a] - arrays[b]).mean() > 5.0


def test_reuse_without_regenerating(small_demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in small_demo.parent.rglob("*")}
    assert prepare_demo(small_demo.parent, **SMALL) == small_demo
    assert {p: p.stat().st_mtime_ns for p in small_demo.parent.rglob("*")} == before
    assert capsys.readouterr().out == ""


def test_regenerates_when_parameters_differ(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    prepare_demo(root, **SMALL)
    assert "generating the demo dataset (18 images)" in capsys.readouterr().out
    manifest = prepare_demo(root, **{**SMALL, "images_per_label": 2})
    assert "generating the demo dataset (12 images)" in capsys.readouterr().out
    assert len(_rows(manifest)) == 12
    assert json.loads((root / "demo.json").read_text(encoding="utf-8"))["images_per_label"] == 2
    assert not (root / "images/obj_000/002.jpg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError, match="holds no demo dataset"):
        prepare_demo(root, **SMALL)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    with pytest.raises(FileExistsError):
        prepare_demo(root / "notes.txt", **SMALL)


def test_uses_an_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert len(_rows(prepare_demo(tmp_path / "empty", **SMALL))) == 18


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_render(*args: int) -> Image.Image:
        calls.append(args)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return render_demo_image(*args)

    monkeypatch.setattr(demo, "render_demo_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo(tmp_path / "data", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_race_keeps_the_other_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    write = demo._write_dataset
    theirs: list[int] = []

    def write_then_lose_the_race(folder: Path, params: dict[str, int]) -> None:
        write(folder, params)
        monkeypatch.setattr(demo, "_write_dataset", write)
        prepare_demo(root, **SMALL)  # another process finishes first
        theirs.append((root / "manifest.csv").stat().st_ino)

    monkeypatch.setattr(demo, "_write_dataset", write_then_lose_the_race)
    assert prepare_demo(root, **SMALL) == root / "manifest.csv"
    assert theirs == [(root / "manifest.csv").stat().st_ino]
    assert len(_rows(root / "manifest.csv")) == 18
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        prepare_demo(tmp_path / "data", num_labels=1)
    assert not (tmp_path / "data").exists()


def test_rendering_is_pinned() -> None:
    """Guards DEMO_VERSION: if this fails the generator's output changed, so bump DEMO_VERSION
    and update the digest."""
    pixels = np.asarray(render_demo_image(seed=0, label=7, index=3, image_size=64))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == "86d77776bd2d1ba0"

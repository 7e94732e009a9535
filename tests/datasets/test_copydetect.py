"""prepare_copydetect on tiny benchmark trees and photo folders: rows, queries, caching, errors."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.copy_edits import EDIT_KINDS
from retrieval.data.manifest import ManifestError, read_manifest
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.transforms import eval_transform
from retrieval.datasets import converters
from retrieval.datasets.copydetect import prepare_copydetect


def _photo(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)
    image.save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def _benchmark(root: Path, originals: int = 13, distractors: int = 9) -> Path:
    for i in range(originals):
        _photo(root / "originals" / f"o{i:02d}.{'png' if i % 2 else 'jpg'}", i)
    for i in range(distractors):
        _photo(root / "distractors" / f"d{i:02d}.jpg", 100 + i)
    overlay = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    overlay.paste((250, 200, 0, 255), (4, 4, 12, 12))
    (root / "overlays").mkdir()
    overlay.save(root / "overlays" / "sun.png")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_benchmark_layout_rows(tmp_path: Path) -> None:
    root = _benchmark(tmp_path / "cd")
    manifest = prepare_copydetect(root)
    assert manifest == root / "manifest.csv"
    rows = _rows(manifest)
    assert list(rows[0]) == ["path", "label", "split", "is_query", "is_gallery", "edit"]
    train = [r for r in rows if r["split"] == "train"]
    gallery = [r for r in rows if r["split"] == "test" and r["is_gallery"] == "1"]
    queries = [r for r in rows if r["is_query"] == "1"]
    pool = sorted(f"distractors/d{i:02d}.jpg" for i in range(9))
    assert sorted(r["path"] for r in train) == pool
    assert all(r["label"] == r["path"] and r["is_gallery"] == "0" for r in train)
    originals = sorted(f"originals/o{i:02d}.{'png' if i % 2 else 'jpg'}" for i in range(13))
    assert sorted(r["path"] for r in gallery) == sorted(originals + pool)
    assert all(r["label"] == r["path"] and r["edit"] == "" for r in gallery)
    assert len(queries) == 13 * 12 and all(r["is_gallery"] == "0" for r in queries)
    per_original = Counter(r["label"] for r in queries)
    assert set(per_original) == set(originals) and set(per_original.values()) == {12}
    # 13 originals x 12 edits: each kind left out once, so used 12 times
    assert Counter(r["edit"] for r in queries) == dict.fromkeys(EDIT_KINDS, 12)
    for r in queries:
        assert r["path"].startswith("queries/") and r["path"].endswith(f"_{r['edit']}.jpg")
        with Image.open(root / r["path"]) as image:
            assert image.format == "JPEG"
    # the reader takes one path in two splits; both rows come back
    read = read_manifest(manifest)
    assert len(read) == len(rows)
    assert {r.extra["edit"] for r in read if r.is_query} == set(EDIT_KINDS)


def test_rows_feed_the_datamodule_protocol(tmp_path: Path) -> None:
    from retrieval.data.datamodule import RetrievalDataModule

    root = _benchmark(tmp_path / "cd", originals=4, distractors=6)
    manifest = prepare_copydetect(root, edits_per_original=2)
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=1.0)
    module = RetrievalDataModule(manifest, pre, root=root)
    dataset = module.eval_set()
    flags = Counter((r.is_query, r.is_gallery) for r in dataset.rows)
    assert flags == {(True, False): 8, (False, True): 10}
    assert eval_transform(pre)(Image.open(dataset.rows[-1].path)).shape == (3, 32, 32)


def test_queries_are_seeded_and_reused(tmp_path: Path) -> None:
    a = prepare_copydetect(_benchmark(tmp_path / "a"), edits_per_original=3, seed=4)
    b = prepare_copydetect(_benchmark(tmp_path / "b"), edits_per_original=3, seed=4)
    names = [r["path"] for r in _rows(a) if r["is_query"] == "1"]
    assert names == [r["path"] for r in _rows(b) if r["is_query"] == "1"]
    for name in names:
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    first = a.parent / names[0]
    stamp = first.stat().st_mtime_ns
    assert prepare_copydetect(a.parent, edits_per_original=3, seed=4) == a
    assert first.stat().st_mtime_ns == stamp  # same inputs: nothing rewritten
    other = prepare_copydetect(a.parent, edits_per_original=3, seed=5)
    assert first.read_bytes() != (b.parent / names[0]).read_bytes()  # new seed, new pixels
    assert other == a


def test_changed_inputs_or_missing_queries_rebuild(tmp_path: Path) -> None:
    root = _benchmark(tmp_path / "cd", originals=3, distractors=4)
    manifest = prepare_copydetect(root, edits_per_original=2)
    query = root / _rows(manifest)[-1]["path"]
    query.unlink()
    prepare_copydetect(root, edits_per_original=2)
    assert query.is_file()  # a missing query is written again
    before = query.read_bytes()
    _photo(root / "originals" / "o02.jpg", 77)  # an original changed
    prepare_copydetect(root, edits_per_original=2)
    assert query.read_bytes() != before
    _photo(root / "distractors" / "new.jpg", 78)  # the pool changed: the rows follow
    rows = _rows(prepare_copydetect(root, edits_per_original=2))
    assert "distractors/new.jpg" in {r["path"] for r in rows if r["split"] == "train"}


def test_folder_of_photos_holds_out_a_seeded_tenth(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(34):
        _photo(photos / ("trip" if i % 3 else "home") / f"img{i:02d}.jpg", i)
    manifest = prepare_copydetect(photos, edits_per_original=1, seed=1)
    rows = _rows(manifest)
    held = {r["label"] for r in rows if r["is_query"] == "1"}
    train = {r["path"] for r in rows if r["split"] == "train"}
    assert len(held) == 3 and not held & train and len(train) == 31
    assert {r["path"] for r in rows if r["is_gallery"] == "1"} == held | train
    # the queries written under photos/ are not taken for photos on the next call
    again = _rows(prepare_copydetect(photos, edits_per_original=1, seed=1))
    assert again == rows
    assert len({r["label"] for r in _rows(prepare_copydetect(photos, holdout=2)) if r["edit"]}) == 2
    other = {r["label"] for r in _rows(prepare_copydetect(photos, seed=2)) if r["edit"]}
    assert other != held


def test_errors_name_the_folder_and_the_fix(tmp_path: Path) -> None:
    few = tmp_path / "few"
    for i in range(5):
        _photo(few / f"{i}.jpg", i)
    with pytest.raises(ManifestError, match=r"few holds 5 images.*fewer than 20"):
        prepare_copydetect(few)
    with pytest.raises(ManifestError, match="not an existing folder"):
        prepare_copydetect(tmp_path / "nowhere")
    root = _benchmark(tmp_path / "cd", originals=2, distractors=2)
    for image in (root / "distractors").iterdir():
        image.unlink()
    with pytest.raises(ManifestError, match=r"distractors holds no images.*get_copydetect"):
        prepare_copydetect(root)
    with pytest.raises(ManifestError, match="edits_per_original=0"):
        prepare_copydetect(root, edits_per_original=0)


def test_a_foreign_queries_folder_is_never_replaced(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(20):
        _photo(photos / f"{i:02d}.jpg", i)
    mine = _photo(photos / "queries" / "keep.jpg", 99)
    with pytest.raises(ManifestError, match="not written by prepare_copydetect"):
        prepare_copydetect(photos)
    assert mine.is_file()
    manifest = prepare_copydetect(photos, output=tmp_path / "elsewhere" / "m.csv")
    rows = read_manifest(manifest, root=photos)
    assert all(r.path.is_file() for r in rows)
    assert {r.path.parent.parent for r in rows if r.is_query} == {
        tmp_path / "elsewhere" / "queries"
    }


def test_converters_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _benchmark(tmp_path / "cd", originals=2, distractors=3)
    assert converters.main(["copydetect", str(root), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert str(root / "manifest.csv") in out
    assert "test: 29 images, 5 labels" in out  # 24 queries + 5 gallery images

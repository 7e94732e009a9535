"""Tests for retrieval.datasets.converters on tiny fake trees in each official layout."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.manifest import ManifestError, ManifestRow, read_manifest
from retrieval.datasets import converters


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (len(path.name) * 9 % 255, 80, 160)).save(path, format="JPEG")
    return path


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _labels(rows: list[ManifestRow], split: str) -> set[str]:
    return {r.label for r in rows if r.split == split}


def _cub_tree(root: Path) -> Path:
    classes = {1: "001.Albatross", 100: "100.Pelican", 101: "101.Puffin", 200: "200.Wren"}
    images, labels, number = [], [], 0
    for cls, folder in classes.items():
        for k in range(2):
            number += 1
            rel = f"{folder}/{folder[4:]}_{k}.jpg"
            _jpeg(root / "images" / rel)
            images.append(f"{number} {rel}\n")
            labels.append(f"{number} {cls}\n")
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(labels))
    return root


def test_cub200_splits_by_class(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path / "CUB_200_2011")
    out = converters.cub200(root)
    assert out == root / "manifest.csv"
    rows = read_manifest(out)
    assert Counter(r.split for r in rows) == {"train": 4, "test": 4}
    assert _labels(rows, "train") == {"1", "100"} and _labels(rows, "test") == {"101", "200"}
    assert _csv_rows(out)[0]["path"] == "images/001.Albatross/Albatross_0.jpg"


def test_cub200_accepts_the_parent_folder(tmp_path: Path) -> None:
    _cub_tree(tmp_path / "CUB_200_2011")
    out = converters.cub200(tmp_path, output=tmp_path / "lists" / "cub.csv")
    assert _csv_rows(out)[0]["path"] == "CUB_200_2011/images/001.Albatross/Albatross_0.jpg"
    assert len(read_manifest(out, root=tmp_path)) == 8


def test_cub200_broken_layouts(tmp_path: Path) -> None:
    root = _cub_tree(tmp_path / "cub")
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(ManifestError, match=r"'image_class_labels.txt' missing under .*README"):
        converters.cub200(root)
    _cub_tree(root)
    (root / "images" / "200.Wren" / "Wren_1.jpg").unlink()
    with pytest.raises(ManifestError, match=r"1 of 8 listed images are missing.*Wren_1.jpg"):
        converters.cub200(root)
    assert not (root / "manifest.csv").exists()


def _cars_files(root: Path) -> list[tuple[str, int, int]]:
    annotations = [("car_ims/000001.jpg", 1, 1), ("car_ims/000002.jpg", 98, 0)]
    annotations += [("car_ims/000003.jpg", 99, 0), ("car_ims/000004.jpg", 196, 1)]
    for rel, _, _ in annotations:
        _jpeg(root / rel)
    return annotations


def test_cars196_from_mat(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    annotations = _cars_files(tmp_path)
    records = np.zeros(
        len(annotations), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    )
    for i, record in enumerate(annotations):
        records[i] = record
    scipy_io.savemat(tmp_path / "cars_annos.mat", {"annotations": records})
    rows = read_manifest(converters.cars196(tmp_path))
    assert [(r.path.name, r.label, r.split) for r in rows] == [
        ("000001.jpg", "1", "train"),
        ("000002.jpg", "98", "train"),
        ("000003.jpg", "99", "test"),
        ("000004.jpg", "196", "test"),
    ]
    assert _csv_rows(tmp_path / "manifest.csv")[0]["path"] == "car_ims/000001.jpg"


def test_cars196_from_csv_and_missing_annotations(tmp_path: Path) -> None:
    annotations = _cars_files(tmp_path)
    text = "relative_im_path,class\n" + "".join(f"{p},{c}\n" for p, c, _ in annotations)
    (tmp_path / "cars_annos.csv").write_text(text)
    rows = read_manifest(converters.cars196(tmp_path))
    assert _labels(rows, "train") == {"1", "98"} and _labels(rows, "test") == {"99", "196"}
    (tmp_path / "cars_annos.csv").write_text("path,label\ncar_ims/000001.jpg,1\n")
    with pytest.raises(ManifestError, match=r"cars_annos.csv, row 1: .*relative_im_path,class"):
        converters.cars196(tmp_path)
    (tmp_path / "cars_annos.csv").unlink()
    with pytest.raises(ManifestError, match=r"'cars_annos.mat' or 'cars_annos.csv' missing"):
        converters.cars196(tmp_path)


def _sop_tree(root: Path) -> None:
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, 1, "bicycle_final/1_0.JPG"), (2, 1, 1, "bicycle_final/1_1.JPG")]
    train += [(3, 2, 2, "cabinet_final/2_0.JPG")]
    test = [(4, 3, 1, "bicycle_final/3_0.JPG"), (5, 4, 12, "toaster_final/4_0.JPG")]
    for name, table in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        (root / name).write_text(header + "".join(" ".join(map(str, r)) + "\n" for r in table))
        for *_, rel in table:
            _jpeg(root / str(rel))


def test_sop_splits_and_category(tmp_path: Path) -> None:
    _sop_tree(tmp_path)
    out = converters.sop(tmp_path)
    rows = read_manifest(out)
    assert Counter(r.split for r in rows) == {"train": 3, "test": 2}
    assert _labels(rows, "train") == {"1", "2"} and _labels(rows, "test") == {"3", "4"}
    assert [r.extra["category"] for r in rows] == ["1", "1", "2", "1", "12"]
    assert list(_csv_rows(out)[0]) == ["path", "label", "split", "category"]


def test_sop_broken_layouts(tmp_path: Path) -> None:
    _sop_tree(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(ManifestError, match=r"sop: 'Ebay_test.txt' missing under"):
        converters.sop(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text("id class super path\n")
    with pytest.raises(ManifestError, match=r"Ebay_test.txt, line 1: expected the header"):
        converters.sop(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n4 x 1 a.JPG\n")
    with pytest.raises(ManifestError, match=r"Ebay_test.txt, line 2, field 'class_id': 'x'"):
        converters.sop(tmp_path)


_INSHOP = [
    ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train"),
    ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train"),
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "query"),
    ("img/MEN/Denim/id_00000007/02_2_side.jpg", "id_00000007", "gallery"),
    ("img/MEN/Denim/id_00000007/03_4_full.jpg", "id_00000007", "gallery"),
]


def _inshop_tree(root: Path, image_dir: str = "img", partition: str = "") -> None:
    lines = [f"{len(_INSHOP)}", "image_name item_id evaluation_status"]
    lines += [f"{name} {item} {status}" for name, item, status in _INSHOP]
    (root / partition).mkdir(parents=True, exist_ok=True)
    (root / partition / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    for name, _, _ in _INSHOP:
        _jpeg(root / image_dir / name.removeprefix("img/"))


def test_inshop_flags(tmp_path: Path) -> None:
    _inshop_tree(tmp_path)
    rows = read_manifest(converters.inshop(tmp_path))
    assert [(r.split, r.is_query, r.is_gallery, r.label) for r in rows] == [
        ("train", False, False, "id_00000001"),
        ("train", False, False, "id_00000001"),
        ("test", True, False, "id_00000007"),
        ("test", False, True, "id_00000007"),
        ("test", False, True, "id_00000007"),
    ]
    written = _csv_rows(tmp_path / "manifest.csv")
    assert written[2] == {
        "path": "img/MEN/Denim/id_00000007/01_1_front.jpg",
        "label": "id_00000007",
        "split": "test",
        "is_query": "1",
        "is_gallery": "0",
    }


@pytest.mark.parametrize("image_dir", ["Img/img", "Img"])
def test_inshop_alternative_folders(tmp_path: Path, image_dir: str) -> None:
    _inshop_tree(tmp_path, image_dir=image_dir, partition="Eval")
    out = converters.inshop(tmp_path)
    assert [r["path"].split("/WOMEN/")[0] for r in _csv_rows(out)[:2]] == [image_dir] * 2
    assert len(read_manifest(out)) == len(_INSHOP)


def test_inshop_broken_layouts(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"'list_eval_partition.txt' or .*missing under"):
        converters.inshop(tmp_path)
    _inshop_tree(tmp_path)
    partition = tmp_path / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    partition.write_text("\n".join(["9", *lines[1:]]) + "\n")
    with pytest.raises(ManifestError, match=r"line 1: says 9 images but lists 5"):
        converters.inshop(tmp_path)
    partition.write_text("\n".join([*lines[:-1], lines[-1].replace("gallery", "probe")]) + "\n")
    with pytest.raises(ManifestError, match=r"line 7, field 'evaluation_status': 'probe'"):
        converters.inshop(tmp_path)


def _folder_tree(root: Path) -> None:
    for label in ["ant", "bee", "cat", "dog", "eel", "fox"]:
        _jpeg(root / label / "a.jpg")
        (root / label / "nested").mkdir()
        Image.new("L", (8, 8)).save(root / label / "nested" / "b.PNG")
        (root / label / "notes.txt").write_text("not an image")
        (root / label / ".hidden.jpg").write_bytes(b"")
    (root / "empty_label").mkdir()
    (root / ".cache").mkdir()
    _jpeg(root / ".cache" / "x.jpg")


def test_image_folder_is_deterministic_and_label_disjoint(tmp_path: Path) -> None:
    _folder_tree(tmp_path / "data")
    first = converters.image_folder(tmp_path / "data", output=tmp_path / "a.csv", seed=3)
    second = converters.image_folder(tmp_path / "data", output=tmp_path / "b.csv", seed=3)
    assert first.read_bytes() == second.read_bytes()
    rows = read_manifest(first, root=tmp_path / "data")
    assert len(rows) == 12 and {r.path.suffix for r in rows} == {".jpg", ".PNG"}
    train, test = _labels(rows, "train"), _labels(rows, "test")
    assert len(train) == 3 and len(test) == 3 and not train & test
    assert train | test == {"ant", "bee", "cat", "dog", "eel", "fox"}
    splits = set()
    for seed in range(6):
        out = converters.image_folder(tmp_path / "data", output=tmp_path / f"{seed}.csv", seed=seed)
        splits.add(frozenset(_labels(read_manifest(out, root=tmp_path / "data"), "train")))
    assert len(splits) > 1
    out = converters.image_folder(tmp_path / "data", output=tmp_path / "all.csv", test_fraction=0)
    assert {r.split for r in read_manifest(out, root=tmp_path / "data")} == {"train"}


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no label folders under"):
        converters.image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(ManifestError, match="no image files in the label folders"):
        converters.image_folder(tmp_path)
    with pytest.raises(ManifestError, match="not an existing folder"):
        converters.image_folder(tmp_path / "nope")
    with pytest.raises(ManifestError, match="test_fraction"):
        converters.image_folder(tmp_path, test_fraction=1.5)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _cub_tree(tmp_path / "cub")
    assert converters.main(["cub200", str(root), "--output", str(tmp_path / "m.csv")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        str(tmp_path / "m.csv"),
        "train: 4 images, 2 labels",
        "test: 4 images, 2 labels",
    ]
    with pytest.raises(SystemExit) as info:
        converters.main(["sop", str(root)])
    assert info.value.code == 1
    assert "Ebay_train.txt" in capsys.readouterr().err

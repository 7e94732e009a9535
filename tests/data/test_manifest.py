"""Tests for retrieval.data.manifest: round trips, validation messages, split selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.data.manifest import (
    SPLITS,
    ManifestError,
    ManifestRow,
    read_manifest,
    select_split,
    write_manifest,
)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_round_trip_keeps_flags_and_extra_columns(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    rows = [
        ManifestRow(_touch(root / "img" / "a b" / "1.jpg"), "id_1", "train", False, False),
        ManifestRow(_touch(root / "img" / "2.jpg"), "id_2", "test", True, False, {"category": "x"}),
        ManifestRow(_touch(root / "3.jpg"), "id,3", "test", False, True, {"color": "red"}),
    ]
    out = write_manifest(rows, root / "m.csv")
    assert out == root / "m.csv"
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,label,split,is_query,is_gallery,category,color"
    assert lines[1] == "img/a b/1.jpg,id_1,train,0,0,,"
    assert lines[3] == '3.jpg,"id,3",test,0,1,,red'
    back = read_manifest(out)
    assert [r.path for r in back] == [r.path for r in rows]
    assert [(r.label, r.split, r.is_query, r.is_gallery) for r in back] == [
        (r.label, r.split, r.is_query, r.is_gallery) for r in rows
    ]
    assert [dict(r.extra) for r in back] == [
        {"category": "", "color": ""},
        {"category": "x", "color": ""},
        {"category": "", "color": "red"},
    ]
    assert list(tmp_path.glob(".*.tmp")) == []


def test_write_without_flags_and_outside_root(tmp_path: Path) -> None:
    inside = _touch(tmp_path / "root" / "a.jpg")
    outside = _touch(tmp_path / "elsewhere" / "b.jpg").resolve()
    out = write_manifest(
        [ManifestRow(inside, "1", "train"), ManifestRow(outside, "2", "val")],
        tmp_path / "out" / "m.csv",
        root=tmp_path / "root",
    )
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines == ["path,label,split", "a.jpg,1,train", f"{outside.as_posix()},2,val"]
    back = read_manifest(out, root=tmp_path / "root")
    assert [r.path for r in back] == [inside.resolve(), outside]
    assert back[0].is_query is None and back[0].is_gallery is None and back[0].extra == {}


def test_failed_write_leaves_the_old_file_untouched(tmp_path: Path) -> None:
    out = _write(tmp_path / "m.csv", "old contents\n")
    bad = [
        ManifestRow(tmp_path / "a.jpg", "1", "train"),
        ManifestRow(tmp_path / "b.jpg", "2", "dev"),
    ]
    with pytest.raises(ManifestError, match=r"row 3.*'dev'"):
        write_manifest(bad, out)
    half = [
        ManifestRow(tmp_path / "a.jpg", "1", "test", True, False),
        ManifestRow(tmp_path / "b.jpg", "2", "test"),
    ]
    with pytest.raises(ManifestError, match="is_query/is_gallery"):
        write_manifest(half, out)
    assert out.read_text(encoding="utf-8") == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_reading_accepts_bom_blank_lines_spaces_and_boolean_spellings(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _touch(tmp_path / name)
    text = (
        "\ufeffpath, label ,split,is_query,is_gallery\n"
        "a.jpg , x ,test,Yes,no\n\n"
        "b.jpg,y,test,FALSE,true\n"
        "c.jpg,z,train,0,0\n\n"
    )
    rows = read_manifest(_write(tmp_path / "m.csv", text))
    assert [(r.path.name, r.label, r.is_query, r.is_gallery) for r in rows] == [
        ("a.jpg", "x", True, False),
        ("b.jpg", "y", False, True),
        ("c.jpg", "z", False, False),
    ]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("path,label\na.jpg,1\n", ["row 1", "['split']", "found ['path', 'label']"]),
        ("path,label,split,is_query\na.jpg,1,test,1\n", ["row 1", "'is_query'", "'is_gallery'"]),
        ("path,label,split,label\na.jpg,1,test,2\n", ["row 1", "duplicate", "'label'"]),
        ("path,label,split,\na.jpg,1,test,\n", ["row 1", "column 4 has no name"]),
        ("path,label,split\na.jpg,1,train\na.jpg,,train\n", ["row 3", "column 'label'"]),
        ("path,label,split\n,1,train\n", ["row 2", "column 'path'"]),
        (
            "path,label,split\na.jpg,1,dev\n",
            ["row 2", "column 'split'", "'dev'", "train, val, test"],
        ),
        (
            "path,label,split,is_query,is_gallery\na.jpg,1,test,1,0\nb.jpg,2,test,maybe,0\n",
            ["row 3", "column 'is_query'", "'maybe'"],
        ),
        ("path,label,split,is_query,is_gallery\na.jpg,1,test,1,\n", ["row 2", "'is_gallery'"]),
        ("path,label,split\na.jpg,1,train,extra\n", ["row 2", "4 cells", "3 columns"]),
        ("path,label,split\n", ["no data rows"]),
        ("", ["empty"]),
        ("  \n\n", ["empty"]),
    ],
)
def test_errors_name_file_row_and_column(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = _write(tmp_path / "bad_manifest.csv", text)
    with pytest.raises(ManifestError) as info:
        read_manifest(path, check_files=False)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_or_undecodable_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="nope.csv: manifest file does not exist"):
        read_manifest(tmp_path / "nope.csv")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label,split\nä.jpg,1,train\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="latin1.csv: not UTF-8"):
        read_manifest(latin1, check_files=False)


def test_check_files_counts_missing_images(tmp_path: Path) -> None:
    _touch(tmp_path / "present.jpg")
    names = ["present.jpg"] + [f"gone{i}.jpg" for i in range(6)]
    text = "path,label,split\n" + "".join(f"{n},{i},train\n" for i, n in enumerate(names))
    path = _write(tmp_path / "m.csv", text)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert "m.csv" in message and "6 of 7" in message and "column 'path'" in message
    assert "row 3: " in message and str(tmp_path / "gone0.jpg") in message
    assert "gone4.jpg" in message and "gone5.jpg" not in message
    assert len(read_manifest(path, check_files=False)) == 7


def test_root_argument_resolves_relative_paths(tmp_path: Path) -> None:
    image = _touch(tmp_path / "images" / "cat" / "1.jpg")
    path = _write(tmp_path / "lists" / "m.csv", "path,label,split\ncat/1.jpg,cat,val\n")
    with pytest.raises(ManifestError, match="1 of 1"):
        read_manifest(path)
    [row] = read_manifest(path, root=tmp_path / "images")
    assert row.path == image.resolve() and row.path.is_absolute()


def test_select_split(tmp_path: Path) -> None:
    rows = [
        ManifestRow(tmp_path / "a.jpg", "1", "train"),
        ManifestRow(tmp_path / "b.jpg", "2", "test"),
        ManifestRow(tmp_path / "c.jpg", "3", "train"),
    ]
    assert [r.path.name for r in select_split(rows, "train")] == ["a.jpg", "c.jpg"]
    assert SPLITS == ("train", "val", "test")
    with pytest.raises(ManifestError) as info:
        select_split(rows, "val", manifest_name="/data/m.csv")
    message = str(info.value)
    assert "'val'" in message and "/data/m.csv" in message
    assert "train (2 rows)" in message and "test (1 rows)" in message
    with pytest.raises(ManifestError, match="unknown split 'dev'"):
        select_split(rows, "dev")


def test_folder_labels_name_each_image_by_its_folder_under_the_root(tmp_path: Path) -> None:
    from retrieval.data.manifest import folder_labels

    paths = [tmp_path / "cat" / "1.jpg", tmp_path / "cat" / "tabby" / "2.jpg", tmp_path / "3.jpg"]
    assert folder_labels(paths, tmp_path, "folder") == ["cat", "cat/tabby", None]
    assert folder_labels(paths, tmp_path, "none") == [None, None, None]
    with pytest.raises(ValueError, match="labels must be 'folder' or 'none', got 'folders'"):
        folder_labels(paths, tmp_path, "folders")

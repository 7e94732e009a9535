"""Converters of the instance-retrieval benchmarks on tiny fake trees in their published layouts:
Revisited Oxford/Paris (cropped queries, pixel for pixel), GLDv2 retrieval and DISC2021."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.manifest import ManifestError, read_manifest
from retrieval.datasets import converters


def _noise_jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def revisited_tree(root: Path, name: str = "roxford5k", boxes=None, gallery: int = 6) -> Path:
    """``root/jpg/*.jpg`` and ``root/gnd_<name>.pkl``: ``gallery`` images and 2 queries."""
    imlist = [f"place_{i:03d}" for i in range(gallery)]
    qimlist = ["query_a", "query_b"]
    for i, image in enumerate(imlist + qimlist):
        _noise_jpeg(root / "jpg" / f"{image}.jpg", (40 + i, 30 + 2 * i), seed=i)
    boxes = boxes or [np.array([3.4, 2.6, 20.5, 17.0]), [0.0, 0.0, 40 + gallery + 1, 30.0]]
    gnd = [
        {"bbx": boxes[0], "easy": np.array([0, 2]), "hard": np.array([1]), "junk": np.array([3])},
        {"bbx": boxes[1], "easy": [], "hard": [4], "junk": [5, 0]},
    ]
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(data))
    return root


def test_revisited_rows_and_query_crops_pixel_for_pixel(tmp_path: Path) -> None:
    root = revisited_tree(tmp_path / "roxford5k")
    out = converters.roxford5k(root, tmp_path / "lists" / "roxford5k.csv")
    rows = read_manifest(out, root=root)
    gallery = [r for r in rows if r.is_gallery]
    queries = [r for r in rows if r.is_query]
    assert [r.label for r in gallery] == [f"place_{i:03d}" for i in range(6)]
    assert [r.label for r in queries] == ["query_a", "query_b"]
    assert not any(r.is_query and r.is_gallery for r in rows)
    assert queries[0].extra["gnd_easy"] == "place_000 place_002"
    assert (
        queries[0].extra["gnd_hard"] == "place_001" and queries[0].extra["gnd_junk"] == "place_003"
    )
    assert (
        queries[1].extra["gnd_easy"] == "" and queries[1].extra["gnd_junk"] == "place_005 place_000"
    )
    assert queries[0].path == tmp_path / "lists" / "roxford5k_queries" / "query_a.png"
    # the crop is the region of the decoded original, coordinates rounded (3.4 -> 3, 2.6 -> 3,
    # 20.5 -> 20 half to even, 17.0 -> 17)
    original = np.asarray(Image.open(root / "jpg" / "query_a.jpg").convert("RGB"))
    crop = np.asarray(Image.open(queries[0].path))
    assert crop.shape == (17 - 3, 20 - 3, 3)
    np.testing.assert_array_equal(crop, original[3:17, 3:20])
    whole = np.asarray(Image.open(queries[1].path))  # the full width, the top 30 rows
    b = np.asarray(Image.open(root / "jpg" / "query_b.jpg").convert("RGB"))
    assert b.shape == (44, 47, 3)
    np.testing.assert_array_equal(whole, b[:30])


def test_rparis6k_reads_its_own_gnd_file(tmp_path: Path) -> None:
    root = revisited_tree(tmp_path / "rparis6k", name="rparis6k")
    rows = read_manifest(converters.rparis6k(root))
    assert sum(bool(r.is_query) for r in rows) == 2
    with pytest.raises(ManifestError, match="gnd_roxford5k.pkl"):
        converters.roxford5k(root)


def test_revisited_bad_input_is_one_line_naming_file_and_fix(tmp_path: Path) -> None:
    root = revisited_tree(tmp_path / "r")
    (root / "jpg" / "query_b.jpg").unlink()
    with pytest.raises(ManifestError) as info:
        converters.roxford5k(root)
    message = str(info.value)
    assert "gnd_roxford5k.pkl, qimlist[1]" in message and "'query_b'" in message
    assert "extract" in message and "\n" not in message

    other = revisited_tree(tmp_path / "o", boxes=[[0, 0, 10, 10], [5.0, 5.0, 200.0, 20.0]])
    with pytest.raises(ManifestError) as info:
        converters.roxford5k(other)
    message = str(info.value)
    assert "gnd[1], field 'bbx'" in message and "outside" in message and "\n" not in message

    (other / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(ManifestError, match="'gnd_roxford5k.pkl' missing under"):
        converters.roxford5k(other)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def gldv2_tree(root: Path) -> Path:
    index = ["aaa111", "abc222", "bcd333", "cde444"]
    tests = ["fff001", "fee002", "fed003"]
    for i, image in enumerate(index):
        _noise_jpeg(converters._gldv2_path(root, "index", image), (16, 16), seed=i)
    for i, image in enumerate(tests):
        _noise_jpeg(converters._gldv2_path(root, "test", image), (16, 16), seed=10 + i)
    _write_csv(root / "index.csv", ["id"], [[i] for i in index])
    _write_csv(root / "test.csv", ["id"], [[i] for i in tests])
    solution = [
        ["fff001", "aaa111 bcd333", "Private"],
        ["fee002", "cde444", "Public"],
        ["fed003", "None", "Ignored"],
    ]
    _write_csv(root / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"], solution)
    return root


def test_gldv2_layout_and_usage(tmp_path: Path) -> None:
    root = gldv2_tree(tmp_path / "gldv2")
    rows = read_manifest(converters.gldv2(root))
    queries = [r for r in rows if r.is_query]
    assert [r.label for r in queries] == ["fff001"]
    assert queries[0].extra["gnd_relevant"] == "aaa111 bcd333"
    assert queries[0].path == root / "test" / "f" / "f" / "f" / "fff001.jpg"
    assert sum(bool(r.is_gallery) for r in rows) == 4
    both = read_manifest(converters.gldv2(root, tmp_path / "all.csv", usage="all"), root=root)
    assert [r.label for r in both if r.is_query] == ["fff001", "fee002"]
    _write_csv(root / "index.csv", ["id"], [["aaa111"], ["abc222"]])
    with pytest.raises(ManifestError, match="'bcd333' is not in index.csv"):
        converters.gldv2(root)
    (root / "test.csv").unlink()
    with pytest.raises(ManifestError, match="'test.csv' missing"):
        converters.gldv2(root)


def test_disc21_layout_labels_and_training_background(tmp_path: Path) -> None:
    root = tmp_path / "disc21"
    for folder, names in {
        "dev_queries": ["Q00000", "Q00001", "Q00002"],
        "references": ["R000000", "R000001"],
        "training": ["T000000"],
    }.items():
        for i, name in enumerate(names):
            _noise_jpeg(root / folder / f"{name}.jpg", (12, 12), seed=i)
    truth = [["Q00000", "R000001"], ["Q00001", ""], ["Q00002", "R000000"]]
    _write_csv(root / "public_ground_truth.csv", ["query_id", "reference_id"], truth)
    rows = read_manifest(converters.disc21(root))
    queries = {r.path.stem: r.label for r in rows if r.is_query}
    assert queries == {"Q00000": "R000001", "Q00001": "Q00001", "Q00002": "R000000"}
    assert [r.label for r in rows if r.split == "train"] == ["T000000"]
    truth[0][1] = "R999999"
    _write_csv(root / "public_ground_truth.csv", ["query_id", "reference_id"], truth)
    with pytest.raises(ManifestError, match="row 2: reference 'R999999'"):
        converters.disc21(root)


def sfm120k_tree(root: Path) -> Path:
    """``root/retrieval-SfM-120k.pkl`` and ``root/ims/...``: 4 train images of 2 clusters, 2
    val images of one, laid out as cirtorch's ``cid2filename``."""
    splits = {
        "train": (["a1b2c3d4", "e5f6a7b8", "99887766", "11223344"], [0, 0, 1, 1]),
        "val": (["aabbccdd", "00ffeedd"], [0, 0]),
    }
    data = {}
    for seed, (name, (cids, cluster)) in enumerate(splits.items()):
        for i, cid in enumerate(cids):
            path = root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
            _noise_jpeg(path, (16, 12), seed=10 * seed + i)
        data[name] = {
            "cids": cids,
            "cluster": np.array(cluster),
            "qidxs": [0, 2] if name == "train" else [0],
            "pidxs": [1, 3] if name == "train" else [1],
        }
    (root / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(data))
    return root


def test_sfm120k_clusters_are_labels_and_val_is_the_test_split(tmp_path: Path) -> None:
    root = sfm120k_tree(tmp_path / "sfm")
    rows = read_manifest(converters.sfm120k(root))
    assert [(r.path.name, r.label, r.split) for r in rows] == [
        ("a1b2c3d4", "train-0", "train"),
        ("e5f6a7b8", "train-0", "train"),
        ("99887766", "train-1", "train"),
        ("11223344", "train-1", "train"),
        ("aabbccdd", "val-0", "test"),  # cluster 0 of val is not cluster 0 of train
        ("00ffeedd", "val-0", "test"),
    ]
    assert rows[0].path == root / "ims" / "d4" / "c3" / "b2" / "a1b2c3d4"


def test_sfm120k_bad_input_names_the_file(tmp_path: Path) -> None:
    root = sfm120k_tree(tmp_path / "sfm")
    database = root / "retrieval-SfM-120k.pkl"
    data = pickle.loads(database.read_bytes())
    data["train"]["cluster"] = np.array([0, 1])  # one per cid is required
    database.write_bytes(pickle.dumps(data))
    with pytest.raises(ManifestError, match=r"retrieval-SfM-120k\.pkl, key 'train', key 'cluster'"):
        converters.sfm120k(root)
    data["train"]["cluster"], data["x"] = np.array([0, 0, 1, 1]), eval
    database.write_bytes(pickle.dumps(data))
    with pytest.raises(ManifestError, match="refused to load builtins.eval; a SfM-120k file"):
        converters.sfm120k(root)
    del data["x"]
    database.write_bytes(pickle.dumps(data))
    (root / "ims" / "44" / "33" / "22" / "11223344").unlink()
    with pytest.raises(ManifestError, match="1 of 6 listed images are missing"):
        converters.sfm120k(root)
    database.unlink()
    with pytest.raises(ManifestError, match="'retrieval-SfM-120k.pkl' missing under"):
        converters.sfm120k(root)

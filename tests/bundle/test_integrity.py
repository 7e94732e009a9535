"""Damage that ``verify`` must find and that a rebuild must refuse: every stored row checked,
every required file present, stale export folders reported and removed, backbone kwargs in
``model.json`` limited to safe ones, items removed during a search never returned."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.bundle import writer
from retrieval.bundle.format import BundleError, read_manifest, write_manifest
from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.model_config import build_embedder, check_model_config
from retrieval.bundle.records import ItemRecord, StoreError
from retrieval.cli import main
from retrieval.infra.locks import folder_lock
from retrieval.search import Retriever

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def records(n: int) -> list[ItemRecord]:
    return [ItemRecord(f"img/{i}.jpg", label=str(i % 3), extra={"i": i}) for i in range(n)]


def tamper(db: Path, sql: str, params: tuple[Any, ...]) -> None:
    """Change ``items.sqlite`` behind the software's back, CHECK constraints ignored (as a
    foreign writer or a damaged disk would)."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


def big_component(vector: np.ndarray) -> bytes:
    out = vector.astype("<f4").copy()
    out[0] = 1.45e36
    return out.tobytes()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- every row checked


DAMAGE = {  # item id: (column, value, what the problem says)
    250: ("vector", "big", "norm"),
    260: ("vector", "nan", "NaN or infinite"),
    17: ("uri", "img/\x00evil.jpg", "uri"),
    19: ("uri", "x" * 5000, "uri"),
    30: ("label", "cat\x07", "label"),
    31: ("label", b"\x00cat", "label"),  # a BLOB: TEXT affinity turns numbers into text
    40: ("extra", "not json", "extra"),
    41: ("extra", "[1, 2]", "extra"),
}


def damage_rows(db: Path, vectors: np.ndarray) -> None:
    for item_id, (column, value, _) in DAMAGE.items():
        if column == "vector":
            vec = vectors[item_id - 1].astype("<f4").copy()
            if value == "big":
                blob = big_component(vec)
            elif value == "nan":
                vec[3] = np.nan
                blob = vec.tobytes()
            else:
                blob = vec[:-1].tobytes()
            tamper(db, "UPDATE items SET vector = ? WHERE id = ?", (blob, item_id))
        else:
            tamper(db, f"UPDATE items SET {column} = ? WHERE id = ?", (value, item_id))


def test_verify_checks_every_row_and_names_the_file_and_ids(tmp_path, rng):
    folder = tmp_path / "b"
    vectors = unit(rng, 2000)
    with IndexedItems.create(folder, DIM) as items:
        items.add(records(2000), vectors)
    damage_rows(folder / "items.sqlite", vectors)
    with IndexedItems.open(folder) as items:
        problems = items.verify()
    for item_id, (_, _, says) in DAMAGE.items():
        found = [p for p in problems if "items.sqlite" in p and f"{item_id}" in p and says in p]
        assert found, f"no problem names item {item_id} ({says}): {problems}"


def test_rows_that_break_the_schema_checks_are_named_when_opening(tmp_path, rng):
    folder = tmp_path / "b"
    vectors = unit(rng, 300)
    with IndexedItems.create(folder, DIM) as items:
        items.add(records(300), vectors)
    db = folder / "items.sqlite"
    tamper(db, "UPDATE items SET vector = ? WHERE id = ?", (vectors[269, :-1].tobytes(), 270))
    tamper(db, "UPDATE items SET uri = '' WHERE id = ?", (18,))
    with pytest.raises(StoreError, match=r"items\.sqlite.*integrity") as caught:
        IndexedItems.open(folder)
    message = str(caught.value)
    assert "vector is not 64 bytes: [270]" in message and "uri" in message and "[18]" in message


def test_store_check_rows_streams_in_chunks(tmp_path, rng):
    vectors = unit(rng, 300)
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        items.add(records(300), vectors)
    db = tmp_path / "b" / "items.sqlite"
    tamper(db, "UPDATE items SET vector = ? WHERE id = ?", (big_component(vectors[299]), 300))
    with ItemTable.open(db) as store:
        assert store.check_rows(chunk_size=7) == store.check_rows() != []
        assert any("300" in p for p in store.check_rows(chunk_size=7))


def test_damaged_base_vectors_are_found(tmp_path, rng):
    vectors = unit(rng, 50)
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        items.add(records(50), vectors, base_vectors=vectors)
        assert items.verify() == []
    db = tmp_path / "b" / "items.sqlite"
    tamper(db, "UPDATE base_vectors SET vector = ? WHERE id = ?", (big_component(vectors[4]), 5))
    with IndexedItems.open(tmp_path / "b") as items:
        problems = items.verify()
    assert any("base_vectors" in p and "5" in p for p in problems), problems


def test_rebuild_refuses_damaged_rows_naming_them(tmp_path, rng):
    folder = tmp_path / "b"
    vectors = unit(rng, 400)
    with IndexedItems.create(folder, DIM) as items:
        items.add(records(400), vectors)
    db = folder / "items.sqlite"
    tamper(db, "UPDATE items SET vector = ? WHERE id = ?", (big_component(vectors[122]), 123))
    tamper(db, "UPDATE items SET uri = ? WHERE id = ?", ("a\x1bb", 7))
    with pytest.raises(StoreError, match=r"items\.sqlite.*\b123\b") as caught:
        IndexedItems.open(folder, rebuild_index=True)
    assert "7" in str(caught.value)
    # nothing was snapshotted: the old index still opens, and the damage is still reported
    with IndexedItems.open(folder) as items:
        assert items.verify()


def test_records_with_control_characters_are_refused():
    for bad in ("a\x00b", "a\nb", "x" * 5000):
        with pytest.raises(ValueError, match="uri"):
            ItemRecord(bad)
    with pytest.raises(ValueError, match="label"):
        ItemRecord("ok.jpg", label="a\tb")


def test_retriever_verify_finds_a_damaged_row_and_the_cli_says_so(bundle_copy: Path, capsys):
    with Retriever.load(bundle_copy) as loaded:
        vector = loaded.items.store.vectors([3])[0]
    db = bundle_copy / "items.sqlite"
    tamper(db, "UPDATE items SET vector = ?, uri = ? WHERE id = 3", (big_component(vector), "\x01"))
    assert main(["verify", str(bundle_copy)]) == 1
    out = capsys.readouterr().out
    assert "bundle OK" not in out and "items.sqlite" in out and "[3]" in out
    with pytest.raises(StoreError, match=r"\[3\]"):
        IndexedItems.open(bundle_copy, rebuild_index=True)


def test_a_manifest_that_omits_a_required_file_is_refused(bundle_copy: Path):
    manifest = read_manifest(bundle_copy)
    files = [name for name in manifest.pop("files") if name != "model.ts"]
    fields = {k: v for k, v in manifest.items() if k not in ("format", "format_version")}
    write_manifest(bundle_copy, fields, files)
    (bundle_copy / "model.ts").unlink()
    with pytest.raises(BundleError, match=r"model\.ts"):
        Retriever.load(bundle_copy)
    assert main(["verify", str(bundle_copy)]) != 0


# ---------------------------------------------------------------- stale export folders


def fake_export_model(
    embedder: Any, folder: Path, config: Any, size: int, any_size: bool = False
) -> dict[str, str]:
    names = {
        "model_config": "model.json",
        "weights": "model.safetensors",
        "torchscript": "model.ts",
        "onnx": "model.onnx",
    }
    for name in names.values():
        (folder / name).write_text("{}")
    return names


def stale_folder(parent: Path, name: str, age_s: float = 3600.0) -> Path:
    path = parent / name
    path.mkdir()
    (path / "model.onnx").write_bytes(b"half written")
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def write(target: Path, rng: np.random.Generator, overwrite: bool = False) -> Path:
    from retrieval.data.preprocessing import Preprocessing

    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 0.875)
    items = [writer.GalleryItem(f"{i}.jpg") for i in range(5)]
    return writer.write_bundle(target, None, {}, pre, items, unit(rng, 5), overwrite=overwrite)


def test_a_new_export_removes_and_reports_stale_folders_of_its_target(
    tmp_path, rng, monkeypatch, caplog
):
    monkeypatch.setattr(writer, "export_model", fake_export_model)
    target = tmp_path / "bundle"
    killed = [
        stale_folder(tmp_path, ".bundle.tmp-0123abcd"),
        stale_folder(tmp_path, ".bundle.old-deadbeef"),
    ]
    kept = [
        stale_folder(tmp_path, ".bundle2.tmp-0123abcd"),  # another target
        stale_folder(tmp_path, ".bundle.tmp-notours"),  # not the writer's pattern
        stale_folder(tmp_path, ".bundle.tmp-89abcdef", age_s=0),  # may be another export's
    ]
    with caplog.at_level(logging.WARNING, logger="retrieval.bundle.writer"):
        write(target, rng)
    assert all(not p.exists() for p in killed)
    assert all(p.exists() for p in kept)
    assert all(p.name in caplog.text for p in killed)
    assert (target / "manifest.json").is_file()


def test_a_folder_locked_by_a_running_export_is_not_removed(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(writer, "export_model", fake_export_model)
    busy = stale_folder(tmp_path, ".bundle.tmp-00000000")
    with folder_lock(busy):  # as the export writing it holds it
        write(tmp_path / "bundle", rng)
        assert busy.exists()
    write(tmp_path / "bundle", rng, overwrite=True)
    assert not busy.exists()


def test_verify_reports_stale_folders_beside_the_bundle(bundle_copy: Path):
    stale = stale_folder(bundle_copy.parent, f".{bundle_copy.name}.tmp-0badf00d")
    with Retriever.load(bundle_copy) as loaded:
        problems = loaded.verify()
    assert any(stale.name in p and "interrupted export" in p for p in problems), problems
    assert stale.exists()  # reported, not removed, by verify


# ---------------------------------------------------------------- backbone kwargs


BASE = {
    "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
    "embedder": {"embedding_dim": None, "pooling": "avg", "head_bn": False},
}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
        {"checkpoint_path": "/tmp/evil.pth"},
        {"pretrained": True},
        {"img_size": "224"},
        {"dynamic_img_size": 1},
    ],
)
def test_unsafe_or_mistyped_backbone_kwargs_are_refused(kwargs: dict[str, Any]) -> None:
    config = {**BASE, "backbone": {**BASE["backbone"], "kwargs": kwargs}}
    (key,) = kwargs
    with pytest.raises(BundleError, match=rf"backbone\.kwargs.*'{key}'.*img_size"):
        check_model_config(config)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"img_size": 224, "dynamic_img_size": True},
        {"img_size": [224, 224]},
        {"drop_path_rate": 0.1},
    ],
)
def test_safe_backbone_kwargs_pass(kwargs: dict[str, Any]) -> None:
    config = {**BASE, "backbone": {**BASE["backbone"], "kwargs": kwargs}}
    assert check_model_config(config)["backbone"]["kwargs"] == kwargs


def test_a_bundle_whose_model_json_points_timm_at_a_file_does_not_load(bundle_copy: Path):
    path = bundle_copy / "model.json"
    config = json.loads(path.read_text())
    config["backbone"]["kwargs"] = {"checkpoint_path": str(bundle_copy.parent / "x.pth")}
    path.write_text(json.dumps(config))
    manifest = read_manifest(bundle_copy)
    files = list(manifest.pop("files"))
    write_manifest(bundle_copy, {k: v for k, v in manifest.items() if k != "format"}, files)
    for runtime in ("eager", "onnx"):
        with pytest.raises(BundleError, match="checkpoint_path"):
            Retriever.load(bundle_copy, runtime=runtime)
    with pytest.raises(BundleError, match="checkpoint_path"):
        build_embedder(config, bundle_copy / "model.safetensors")


# ---------------------------------------------------------------- removed during a search


def bare_retriever(folder: Path, items: IndexedItems) -> Retriever:
    return Retriever(folder, {"embedding_dim": DIM}, None, None, items, 1)  # type: ignore[arg-type]


def test_an_item_removed_between_search_and_read_is_not_returned(tmp_path, rng, monkeypatch):
    vectors = unit(rng, 50)
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        items.add(records(50), vectors)
        retriever = bare_retriever(tmp_path / "b", items)
        query = vectors[9:10]  # item 10 is its own best hit
        real_get = items.store.get
        calls = []

        def get_after_removal(ids):
            if not calls:  # the first read: remove item 10 as another thread would
                items.remove([10])
            calls.append(list(ids))
            return real_get(ids)

        monkeypatch.setattr(items.store, "get", get_after_removal)
        hits = retriever.search(query, k=5)[0]
        assert 10 in calls[0]  # the search did find it before it was removed
        assert [h.id for h in hits if h.id == 10] == []
        assert len(hits) == 5
        exact = np.argsort(-(vectors @ query[0]), kind="stable") + 1
        assert [h.id for h in hits] == [int(i) for i in exact if i != 10][:5]


def test_adding_a_file_whose_path_has_a_control_character_lists_it(bundle_copy: Path, tmp_path):
    from tests.bundle_fixtures import new_images

    good, odd = new_images(tmp_path / "new", 2)
    odd = odd.rename(odd.with_name("line\nbreak.jpg"))
    with Retriever.load(bundle_copy) as loaded:
        report = loaded.add([good, odd])
    assert len(report.added) == 1
    assert [name for name, _ in report.unreadable] == [str(odd.resolve())]
    assert "control characters" in report.unreadable[0][1]

"""The Milvus backend after crashes and beside other writers, on Milvus Lite and on a Milvus
server (:mod:`tests.milvus_engines`): a torn or dropped index repaired by ``retrieval push
--repair``, removals through the engine that push keeps, the same images added by two
replicas at once, labels of any characters, one collection layout read by another, and
one-line errors.

A small generated bundle (manifest.json and items.sqlite of random 16-d vectors, no model:
``retrieval push`` reads only these) keeps each test to seconds.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.backends import BackendError, parse_backend
from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.records import ItemRecord

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus) is not installed")

from retrieval.backends.milvus import MilvusBackend, push_bundle, push_store  # noqa: E402
from tests.milvus_engines import ENGINES, engine_target, server_client  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIM, COUNT = 16, 30


def records(count: int, tag: str, labels: tuple[str, ...] = ("cat", "dog")) -> list[ItemRecord]:
    """``count`` items, labels in turn, each with its own image hash."""
    return [
        ItemRecord(
            f"/{tag}/{i}.jpg",
            labels[i % len(labels)],
            {"n": i},
            hashlib.sha256(f"{tag}/{i}".encode()).hexdigest(),
        )
        for i in range(count)
    ]


def unit_rows(count: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """What ``retrieval push`` reads of a bundle: manifest.json and items.sqlite (30 items)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    manifest = {"format": "retrieval-bundle", "format_version": 1, "embedding_dim": DIM}
    manifest |= {"metric": "ip", "index": {"factory": "Flat"}, "files": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with ItemTable.create(folder / "items.sqlite", DIM) as store:
        store.add(records(COUNT, "bundle"), unit_rows(COUNT, 0))
    return folder


@pytest.fixture
def lite(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A Milvus Lite folder (for what only Milvus Lite has: its index files, its lock)."""
    return engine_target("milvus-lite", request, tmp_path / "lite")


@pytest.fixture(params=ENGINES)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty collection on each engine."""
    return engine_target(request.param, request, tmp_path / "lite")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``retrieval ARGS`` in its own process (as a user runs it: stderr as printed)."""
    return subprocess.run(
        [sys.executable, "-m", "retrieval.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stored(target: str) -> collections.Counter[int]:
    """How many rows of each id the collection holds (opened as serve --backend opens it)."""
    with MilvusBackend.connect(parse_backend(target), DIM, read_only=True) as backend:
        rows = backend._client.query(
            backend.spec.collection, filter="id >= 0", output_fields=["id"], limit=16_384
        )
        assert backend.verify() == []
    return collections.Counter(int(r["id"]) for r in rows)


def engine_changes(target: str) -> set[int]:
    """Add 2 items and remove item 3 through the engine (as serve --backend does); the ids
    the collection should then hold."""
    with MilvusBackend.connect(parse_backend(target), DIM) as backend:
        added = backend.add(records(2, "engine"), unit_rows(2, 1)).added
        backend.remove([3])
    return (set(range(1, COUNT + 1)) - {3}) | set(added)


def tear_index(target: str, lite_folder: Path) -> None:
    """Leave what a SIGKILL during Milvus Lite's index write leaves: index files cut short."""
    torn = list((lite_folder / "collections" / "retrieval").glob("**/indexes/*.idx"))
    assert torn, "Milvus Lite wrote no index file"
    for path in torn:
        os.truncate(path, path.stat().st_size // 3)


def drop_index(target: str, lite_folder: Path) -> None:
    """Leave what a kill between making the collection and building its index leaves."""
    with MilvusBackend.connect(parse_backend(target), DIM, read_only=True) as backend:
        backend._client.release_collection(backend.spec.collection)
        backend._client.drop_index(backend.spec.collection, "vector")


def test_push_repair_rebuilds_a_torn_index_file_and_keeps_every_item_once(
    bundle: Path, lite: str, tmp_path: Path
) -> None:
    check_repair(bundle, lite, tmp_path, tear_index)


def test_push_repair_rebuilds_a_dropped_index_and_keeps_every_item_once(
    bundle: Path, target: str, tmp_path: Path
) -> None:
    check_repair(bundle, target, tmp_path, drop_index)


def check_repair(bundle: Path, target: str, tmp_path: Path, damage) -> None:
    """After ``damage``, serve and push refuse with one line naming --repair, push --repair
    rebuilds the index, and every item is there once."""
    lite, collection = target, parse_backend(target).collection
    push_bundle(bundle, parse_backend(lite))
    expected = engine_changes(lite)
    damage(lite, tmp_path / "lite")
    with pytest.raises(BackendError, match=r"cannot be searched: .*push BUNDLE .* --repair'$"):
        MilvusBackend.connect(parse_backend(lite), DIM)  # as serve --backend opens it
    refused = cli("push", str(bundle), lite, "--quiet")
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1, refused
    assert "--repair" in refused.stderr
    repaired = cli("push", str(bundle), lite, "--quiet", "--repair")
    assert repaired.returncode == 0 and repaired.stderr == "", repaired
    said = repaired.stdout.splitlines()
    assert len(said) == 2 and said[0].startswith(f"repaired collection '{collection}'"), said
    assert "rebuilt its HNSW index from its 31 stored vectors" in said[0]
    assert said[1].startswith("pushed 0, already there 29, deleted 0, left out 1"), said
    counts = stored(lite)
    assert set(counts) == expected and set(counts.values()) == {1}


def test_push_does_not_bring_back_items_removed_through_the_engine(
    bundle: Path, target: str
) -> None:
    spec = parse_backend(target)
    push_bundle(bundle, spec)
    with MilvusBackend.connect(spec, DIM) as replica:
        assert replica.remove([3, 4]) == [3, 4]
    with ItemTable.open(bundle / "items.sqlite") as store:
        store.remove([5])
        report = push_store(store, spec)
    assert set(stored(target)) == set(range(1, COUNT + 1)) - {3, 4, 5}
    assert (report.pushed, report.deleted, report.left_out, report.total) == (0, 1, 2, 27)


def test_two_replicas_adding_the_same_images_at_once_store_each_once(
    bundle: Path, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica b looks for the images' hashes before replica a has written them (the race of
    two replicas given the same images at once) and writes after it."""
    spec = parse_backend(target)
    push_bundle(bundle, spec)
    new, x = records(15, "upload"), unit_rows(15, 2)
    with MilvusBackend.connect(spec, DIM) as a, MilvusBackend.connect(spec, DIM) as b:
        monkeypatch.setattr(b, "_ids_by_sha256", lambda shas: {})
        first, second = a.add(new, x), b.add(new, x)
        assert second.ids == first.ids and len(set(first.ids)) == 15
        assert all(2**52 <= i < 2**53 for i in first.ids)
        assert a.ntotal == COUNT + 15
        for record, item_id in zip(new, first.ids, strict=True):
            assert b.find_by_sha256(str(record.content_sha256)) == [item_id]


def test_an_image_whose_hash_id_another_image_holds_gets_the_next_id(
    bundle: Path, target: str
) -> None:
    spec = parse_backend(target)
    push_bundle(bundle, spec)
    (record,) = records(1, "clash")
    taken = 2**52 + int(str(record.content_sha256)[:13], 16)
    other = ItemRecord("/other.jpg", "cat", {}, "f" * 64)
    with MilvusBackend.connect(spec, DIM) as backend:
        backend.write_rows([backend.row(taken, other, unit_rows(1, 4)[0], "then")])
        assert backend.add([record], unit_rows(1, 5)).added == [taken + 1]
        assert backend.find_by_sha256("f" * 64) == [taken]


LABELS = ["cat", 'say "hi"', "back\\slash", "tab\tin", "é 中"]
ODD = ["a\nb", "cat\n", "\rcat", "x\x00y", "", "c" * 5000, 'cat" || label != "', "\udcff"]


def test_labels_of_any_characters_find_what_the_bundle_finds_and_never_fail(
    tmp_path: Path, target: str
) -> None:
    from retrieval.bundle.items import IndexedItems

    stored_labels = tuple(label for label in LABELS if "\t" not in label)  # \t is refused
    x = unit_rows(12, 3)
    with IndexedItems.create(tmp_path / "items", DIM) as items:
        items.add(records(12, "labels", stored_labels), x)
        push_store(items.store, parse_backend(target))
        with MilvusBackend.connect(parse_backend(target), DIM, read_only=True) as milvus:
            for label in LABELS + ODD:
                try:
                    expected = items.search(x[:2], 5, label=label)[1]
                except UnicodeEncodeError:  # the bundle's SQLite cannot bind a lone surrogate
                    expected = np.zeros((2, 0), np.int64)
                got = milvus.search(x[:2], 5, label=label)[1]
                assert got.tolist() == expected.tolist(), label


def test_push_checks_its_batch_size_before_touching_the_engine(
    bundle: Path, target: str, tmp_path: Path
) -> None:
    refused = cli("push", str(bundle), target, "--batch-size", "0", "--quiet")
    assert refused.returncode == 2, refused
    assert refused.stderr == "error: --batch-size must be a positive integer, got 0\n"
    assert not touched(target, tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -1"):
        push_bundle(bundle, parse_backend(target), batch_size=-1)
    assert not touched(target, tmp_path)


def touched(target: str, tmp_path: Path) -> bool:
    """Whether the engine of ``target`` holds anything of it: Milvus Lite's folder, or the
    server's collection."""
    spec = parse_backend(target)
    if spec.kind == "milvus-lite":
        return (tmp_path / "lite").exists()
    client = server_client(spec.uri.removeprefix("http://"))
    try:
        return bool(client.has_collection(spec.collection))
    finally:
        client.close()


HOLD = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], "LOCK"), os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_process_on_a_milvus_lite_folder_gets_one_error_line(
    bundle: Path, lite: str, tmp_path: Path
) -> None:
    """Another process holds the folder's lock, as a running Milvus Lite does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "lite")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        refused = cli("push", str(bundle), lite, "--quiet")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert refused.returncode == 2, refused
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: "), refused
    assert "another process holds the lock" in refused.stderr

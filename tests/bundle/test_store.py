"""ItemTable and IndexedItems: durability, replay after snapshots, clear errors, concurrency."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.records import AddResult, ItemRecord, StoreError
from retrieval.bundle.snapshot import IndexStateError

DIM = 16
REPO = Path(__file__).resolve().parents[2]


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def records(n: int, prefix: str = "img") -> list[ItemRecord]:
    return [ItemRecord(f"{prefix}/{i}.jpg", label=str(i % 3), extra={"i": i}) for i in range(n)]


def crash_image(folder: Path, dest: Path) -> Path:
    """The folder as a SIGKILL at this moment would leave it (commits live in db + WAL)."""
    dest.mkdir()
    for f in folder.iterdir():
        if f.name != ".lock" and not f.name.endswith("-shm"):
            shutil.copy2(f, dest / f.name)
    return dest


def assert_finds_itself(items: IndexedItems, vectors: dict[int, np.ndarray]) -> None:
    """Each stored vector's best hit is its own id with score ~1; nothing else is indexed."""
    ids = sorted(vectors)
    assert items.ntotal == len(ids)
    scores, found = items.search(np.stack([vectors[i] for i in ids]), 3)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_add_then_reopen_finds_items(tmp_path, rng):
    x = unit(rng, 50)
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        result = items.add(records(50), x)
        assert result.added == result.ids == list(range(1, 51)) and result.duplicates == []
    with IndexedItems.open(tmp_path / "b") as again:
        assert_finds_itself(again, dict(zip(result.ids, x, strict=True)))
        item = again.store.get([result.ids[7]])[0]
        assert (item.uri, item.label, item.extra, item.active) == ("img/7.jpg", "1", {"i": 7}, True)
        np.testing.assert_array_equal(item.vector, x[7])
        assert again.verify() == []


KILLED_CHILD = """
import os, signal, sys
import numpy as np
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.records import ItemRecord
items = IndexedItems.open(sys.argv[1], snapshot_every=None)
rng = np.random.default_rng(1)
for batch in range(4):
    x = rng.standard_normal((10, 16))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    result = items.add([ItemRecord(f"b{batch}/{i}.jpg") for i in range(10)], x)
    print("ACK", *result.ids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_right_after_ack_loses_no_acknowledged_item(tmp_path):
    IndexedItems.create(tmp_path / "b", DIM).close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    acked = [[int(t) for t in line.split()[1:]] for line in child.stdout.splitlines()]
    assert len(acked) == 4 and all(len(ids) == 10 for ids in acked)
    rng = np.random.default_rng(1)
    vectors = {}
    for ids in acked:
        x = rng.standard_normal((10, 16))
        vectors.update(zip(ids, x / np.linalg.norm(x, axis=1, keepdims=True), strict=True))
    with IndexedItems.open(tmp_path / "b") as items:
        assert items.store.last_snapshot().max_id == 0  # found by replaying the store
        assert_finds_itself(items, vectors)


@pytest.mark.parametrize(("factory", "params"), [("Flat", ""), ("IVF4,Flat", "nprobe=4")])
def test_removals_before_and_after_snapshot_are_replayed(tmp_path, rng, factory, params):
    x = unit(rng, 80)
    train = x if factory != "Flat" else None
    items = IndexedItems.create(tmp_path / "b", DIM, factory, params, train, snapshot_every=None)
    ids = items.add(records(40), x[:40]).ids
    items.remove(ids[3:8])  # before the snapshot
    items.snapshot()
    ids += items.add(records(40, "late"), x[40:]).ids
    removed = [ids[0], ids[20], ids[39], ids[45], ids[79]]  # covered and new ones
    items.remove(removed)
    expected = {i: v for i, v in zip(ids, x, strict=True) if i not in [*ids[3:8], *removed]}
    assert_finds_itself(items, expected)
    image = crash_image(tmp_path / "b", tmp_path / "crash")
    items.close()
    with IndexedItems.open(image) as reopened:
        assert reopened.store.last_snapshot().max_id == 40
        assert_finds_itself(reopened, expected)
        assert reopened.verify() == []
    with IndexedItems.open(tmp_path / "b") as closed:  # close() snapshotted everything
        assert closed.store.last_snapshot().max_id == 80
        assert_finds_itself(closed, expected)


def test_hnsw_removal_rebuilds_the_index(tmp_path, rng):
    x = unit(rng, 60)
    items = IndexedItems.create(tmp_path / "b", DIM, "HNSW16", snapshot_every=None)
    ids = items.add(records(60), x).ids
    items.snapshot()
    assert items.remove(ids[10:20]) == ids[10:20]
    expected = {i: v for i, v in zip(ids, x, strict=True) if i not in ids[10:20]}
    assert_finds_itself(items, expected)
    image = crash_image(tmp_path / "b", tmp_path / "crash")  # removal after the snapshot
    items.close()
    with IndexedItems.open(image) as reopened:
        assert_finds_itself(reopened, expected)
    with IndexedItems.open(tmp_path / "b") as auto:  # default: snapshot right after a rebuild
        auto.remove([ids[0]])
        assert auto.store.last_snapshot().removal_seq == 2
        del expected[ids[0]]
        assert_finds_itself(auto, expected)


def test_ivf_needs_training_and_rebuild_retrains(tmp_path, rng):
    x = unit(rng, 320)
    with pytest.raises(ValueError, match="train_vectors"):
        IndexedItems.create(tmp_path / "untrained", DIM, "IVF8,SQ8")
    assert not (tmp_path / "untrained" / "items.sqlite").exists()
    with IndexedItems.create(tmp_path / "b", DIM, "IVF8,SQ8", "nprobe=8", x) as items:
        ids = items.add(records(320), x).ids
        _, found = items.search(x[:50], 10)
        assert all(i in row for i, row in zip(ids[:50], found, strict=True))
    with IndexedItems.open(tmp_path / "b", rebuild_index=True) as rebuilt:
        assert rebuilt.factory == "IVF8,SQ8" and rebuilt.ntotal == 320
        assert rebuilt.verify() == []


def test_duplicates_by_content_sha256_are_not_added_again(tmp_path, rng):
    x = unit(rng, 4)
    sha = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    recs = [ItemRecord(f"{i}.jpg", content_sha256=sha[i]) for i in range(3)]
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        first = items.add(recs, x[:3])
        again = items.add(
            [ItemRecord("copy.jpg", content_sha256=sha[1].upper()), ItemRecord("new.jpg")],
            x[[1, 3]],
        )
        assert again == AddResult(ids=[first.ids[1], 4], added=[4], duplicates=[(0, 2)])
        twice = items.add([ItemRecord("a", content_sha256="f" * 64)] * 2, x[:2])
        assert twice == AddResult(ids=[5, 5], added=[5], duplicates=[(1, 5)])
        assert items.store.find_by_sha256(sha[1]) == [2]
        items.remove([2])
        assert items.add([recs[1]], x[1:2]).added == [6]  # the original is gone: added anew
        assert items.ntotal == 5


def test_remove_unknown_or_removed_ids_changes_nothing(tmp_path, rng):
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        ids = items.add(records(5), unit(rng, 5)).ids
        items.remove([ids[0]])
        with pytest.raises(KeyError, match=r"unknown item ids .*\[98, 99\]"):
            items.remove([ids[1], 99, 98])
        with pytest.raises(ValueError, match=rf"already removed .*\[{ids[0]}\]"):
            items.remove([ids[2], ids[0]])
        assert items.ntotal == 4 and items.store.removal_seq == 1
        assert [it.active for it in items.store.get(ids)] == [False, True, True, True, True]
        with pytest.raises(KeyError, match="unknown item ids"):
            items.store.get([1234])


def test_corrupt_index_file_is_refused_and_rebuild_fixes_it(tmp_path, rng):
    x = unit(rng, 30)
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        ids = items.add(records(30), x).ids
    path = tmp_path / "b" / "index.faiss"
    data = bytearray(path.read_bytes())
    data[200:208] = bytes(8)
    path.write_bytes(bytes(data))
    with pytest.raises(IndexStateError, match=r"index.faiss.*sha256.*rebuild_index=True"):
        IndexedItems.open(tmp_path / "b")
    with IndexedItems.open(tmp_path / "b", rebuild_index=True) as rebuilt:
        assert rebuilt.verify() == []
    with IndexedItems.open(tmp_path / "b") as items:
        assert_finds_itself(items, dict(zip(ids, x, strict=True)))
    path.unlink()
    with pytest.raises(IndexStateError, match="no index file"):
        IndexedItems.open(tmp_path / "b")


def test_interrupted_snapshot_is_finished_or_discarded(tmp_path, rng):
    x = unit(rng, 10)
    folder = tmp_path / "b"
    with IndexedItems.create(folder, DIM) as items:
        ids = items.add(records(10), x).ids
        items.snapshot()
        (folder / "index.faiss").rename(folder / "index.faiss.pending")  # killed before rename
        (folder / "index.faiss").write_bytes(b"the previous snapshot")
    with IndexedItems.open(folder) as items:
        assert not (folder / "index.faiss.pending").exists()
        assert_finds_itself(items, dict(zip(ids, x, strict=True)))
        (folder / "index.faiss.pending").write_bytes(b"killed before it was recorded")
    with IndexedItems.open(folder) as items:
        assert not (folder / "index.faiss.pending").exists() and items.verify() == []


def test_bad_store_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk" / "items.sqlite"
    junk.parent.mkdir()
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"junk/items.sqlite is not an SQLite database"):
        IndexedItems.open(junk.parent)
    with pytest.raises(FileNotFoundError, match="no item store"):
        ItemTable.open(tmp_path / "missing.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="other.sqlite is an SQLite database but not an item"):
        ItemTable.open(other)


@pytest.mark.parametrize(
    ("version", "message"), [(2, "newer than this software"), (0, "re-export")]
)
def test_other_schema_version_is_refused(tmp_path, version, message):
    ItemTable.create(tmp_path / "items.sqlite", DIM).close()
    with sqlite3.connect(tmp_path / "items.sqlite") as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    conn.close()
    with pytest.raises(StoreError, match=rf"items.sqlite has schema version {version}.*{message}"):
        ItemTable.open(tmp_path / "items.sqlite")


def test_damaged_database_pages_fail_the_integrity_check(tmp_path, rng):
    path = tmp_path / "items.sqlite"
    with ItemTable.create(path, DIM) as store:
        store.add(records(400), unit(rng, 400))
    with sqlite3.connect(path) as conn:  # fold the WAL into the file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    data[3 * page : 3 * page + 200] = bytes(range(200))  # garble a b-tree page header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"items.sqlite (failed its integrity check|is damaged)"):
        ItemTable.open(path)


def test_store_rejects_bad_input_without_writing(tmp_path, rng):
    with ItemTable.create(tmp_path / "items.sqlite", DIM) as store:
        with pytest.raises(ValueError, match="L2-normalised"):
            store.add(records(2), 2 * unit(rng, 2))
        with pytest.raises(ValueError, match=r"shape \(2, 16\)"):
            store.add(records(2), unit(rng, 3))
        assert store.active_count == 0 and store.max_id == 0
    with pytest.raises(ValueError, match="64 hex digits"):
        ItemRecord("a.jpg", content_sha256="abc")
    with pytest.raises(ValueError, match="not JSON"):
        ItemRecord("a.jpg", extra={"x": object()})
    with pytest.raises(FileExistsError):
        ItemTable.create(tmp_path / "items.sqlite", DIM)


def test_iter_active_yields_chunks_in_id_order(tmp_path, rng):
    x = unit(rng, 30)
    with ItemTable.create(tmp_path / "items.sqlite", DIM) as store:
        ids = store.add(records(30), x)
        store.remove(ids[::4])
        chunks = list(store.iter_active(chunk_size=7))
        assert [len(c[0]) for c in chunks] == [7, 7, 7, 1]
        got_ids = np.concatenate([c[0] for c in chunks])
        want = [i for i in ids if i not in ids[::4]]
        np.testing.assert_array_equal(got_ids, want)
        np.testing.assert_array_equal(store.active_ids(), want)
        np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), x[np.isin(ids, want)])
        after = np.concatenate([c[0] for c in store.iter_active(chunk_size=5, after_id=20)])
        np.testing.assert_array_equal(after, [i for i in want if i > 20])


def test_concurrent_searches_during_adds_and_removes(tmp_path, rng):
    x = unit(rng, 400)
    vectors: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    stop = threading.Event()
    items = IndexedItems.create(tmp_path / "b", DIM, snapshot_every=50)
    vectors.update(zip(items.add(records(20), x[:20]).ids, x[:20], strict=True))

    def searcher(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = unit(local, 5)
                scores, found = items.search(q, 4)
                seen.append((q, scores, found))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for start in range(20, 400, 20):
        ids = items.add(records(20, f"b{start}"), x[start : start + 20]).ids
        vectors.update(zip(ids, x[start : start + 20], strict=True))
        items.remove(ids[:3])
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and len(seen) > 10
    table = np.full((max(vectors) + 1, DIM), np.nan, dtype=np.float32)
    table[list(vectors)] = np.stack(list(vectors.values()))
    q, scores, found = (np.concatenate(parts) for parts in zip(*seen, strict=True))
    assert (found > 0).all()  # every id is real and scored with its own vector
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, table[found]), atol=1e-5)
    assert items.verify() == []
    items.close()


def test_verify_reports_broken_states(tmp_path, rng):
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        ids = items.add(records(20), unit(rng, 20)).ids
        items.snapshot()
        assert items.verify() == []
        items.store.remove([ids[4]])  # behind the index's back
        (tmp_path / "b" / "index.faiss").write_bytes(b"overwritten")
        problems = items.verify()
        assert any("index holds 20 vectors" in p and "19 active" in p for p in problems)
        assert any("index.faiss has sha256" in p for p in problems)


def test_one_owner_per_folder_and_empty_search(tmp_path, rng):
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        with pytest.raises(RuntimeError, match="already open"):
            IndexedItems.open(tmp_path / "b")
        scores, found = items.search(unit(rng, 3), 5)
        assert scores.shape == found.shape == (3, 0)
    with pytest.raises(FileExistsError):
        IndexedItems.create(tmp_path / "b", DIM)


def test_readers_open_beside_the_writer_and_never_write(tmp_path, rng):
    from retrieval.bundle.format import ReadOnlyError

    folder = tmp_path / "b"
    with IndexedItems.create(folder, DIM) as writer:
        ids = writer.add(records(10), unit(rng, 10)).ids
        writer.snapshot()
        writer.add(records(2, "late"), unit(rng, 2))  # committed, not in the snapshot yet
        writer.remove([ids[0]])
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        reader = IndexedItems.open(folder, read_only=True)
        assert reader.read_only and reader.ntotal == 11
        scores, found = reader.search(writer.store.vectors([ids[3]]), 1)
        assert found[0, 0] == ids[3] and scores[0, 0] > 0.999
        for change in (
            lambda: reader.add(records(1, "x"), unit(rng, 1)),
            lambda: reader.remove([ids[1]]),
            reader.snapshot,
        ):
            with pytest.raises(ReadOnlyError, match="opened read-only"):
                change()
        reader.close()
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
        with pytest.raises(ValueError, match="rebuild_index"):
            IndexedItems.open(folder, read_only=True, rebuild_index=True)


def test_a_reader_loads_the_recorded_pending_snapshot_of_a_killed_writer(tmp_path, rng):
    """A writer killed between recording a snapshot and renaming its file: the reader loads
    the pending file it recorded (it cannot finish the rename); the next writer does."""
    from retrieval.bundle.records import Snapshot
    from retrieval.bundle.snapshot import INDEX_FILE, PENDING_FILE

    folder = tmp_path / "b"
    with IndexedItems.create(folder, DIM) as writer:
        writer.add(records(5), unit(rng, 5))
        writer.snapshot()
        writer.add(records(3, "more"), unit(rng, 3))
        index, store = writer._index, writer.store
        sha = index.save(folder / PENDING_FILE)
        store.record_snapshot(Snapshot(sha, 8, store.max_id, store.removal_seq, "Flat", ""))
        writer._since_snapshot = 0  # the kill: no rename, no snapshot at close
    with IndexedItems.open(folder, read_only=True) as reader:
        assert reader.ntotal == 8
    assert (folder / PENDING_FILE).exists()  # the reader wrote nothing
    with IndexedItems.open(folder) as writer:
        assert writer.ntotal == 8 and writer.verify() == []
    assert not (folder / PENDING_FILE).exists() and (folder / INDEX_FILE).exists()

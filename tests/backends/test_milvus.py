"""The Milvus backend against the bundle's own FAISS + SQLite store, on Milvus Lite and on a
real Milvus server (:mod:`tests.milvus_engines`).

Milvus Lite runs in the test process (``milvus-lite:PATH``) or as its own server process
(``python -m milvus_lite server``, reached as ``milvus://127.0.0.1:PORT/COLLECTION``); the
server is a Milvus standalone server on loopback, reached the same way.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrieval.backends import BackendError, parse_backend
from retrieval.bundle.records import ItemRecord
from retrieval.search import Retriever
from tests.bundle_fixtures import Gallery, new_images
from tests.milvus_engines import ENGINES, collection_name, engine_target, fresh_collection
from tests.service.conftest import AUTH, TOKEN, make_client

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus) is not installed")

from retrieval.backends.milvus import MilvusBackend, choose_index, push_bundle  # noqa: E402


def assert_same_results(
    expected: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]
) -> None:
    """Same ids in the same order, scores within 1e-5; two ids may swap places only where
    their scores are that close (a tie up to float rounding)."""
    (s1, i1), (s2, i2) = expected, got
    assert i1.shape == i2.shape, (i1.shape, i2.shape)
    np.testing.assert_allclose(s2, s1, atol=1e-5)
    for row in range(i1.shape[0]):
        for col in np.flatnonzero(i1[row] != i2[row]):
            near = np.abs(s1[row] - s1[row, col]) <= 1e-5
            assert i2[row, col] in i1[row, near], (row, col, i1[row], i2[row])


@pytest.fixture(params=ENGINES)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty collection on each engine."""
    return engine_target(request.param, request, tmp_path / "lite")


@pytest.fixture
def pushed(bundle_copy: Path, target: str) -> str:
    report = push_bundle(bundle_copy, parse_backend(target))
    assert (report.pushed, report.present, report.total) == (40, 0, 40)
    return target


def test_search_equals_the_faiss_backend(bundle_copy: Path, gallery: Gallery, pushed: str) -> None:
    with Retriever.load(bundle_copy) as bundle, Retriever.load(bundle_copy, backend=pushed) as mv:
        assert len(mv) == len(bundle) == 40
        x = gallery.vectors
        for k in (1, 5, 40):
            assert_same_results(bundle.items.search(x, k), mv.items.search(x, k))
        hits_b, hits_m = bundle.search(x[:3], k=7), mv.search(x[:3], k=7)
        for row_b, row_m in zip(hits_b, hits_m, strict=True):
            assert [(h.id, h.label, h.uri, h.extra) for h in row_b] == [
                (h.id, h.label, h.uri, h.extra) for h in row_m
            ]
        item_b, item_m = bundle.item(9), mv.item(9)
        assert (item_m.uri, item_m.label, item_m.content_sha256) == (
            item_b.uri,
            item_b.label,
            item_b.content_sha256,
        )
        np.testing.assert_array_equal(item_m.vector, item_b.vector)


def test_label_filters_agree(bundle_copy: Path, gallery: Gallery, pushed: str) -> None:
    with Retriever.load(bundle_copy) as bundle, Retriever.load(bundle_copy, backend=pushed) as mv:
        for label in sorted(set(gallery.labels)):
            expected = bundle.items.search(gallery.vectors, 10, label=label)
            got = mv.items.search(gallery.vectors, 10, label=label)
            assert_same_results(expected, got)
            assert got[1].shape == (40, 4)  # the label's four items
        for store in (bundle.items, mv.items):
            scores, ids = store.search(gallery.vectors[:2], 5, label='no "such" \\ label')
            assert ids.shape == (2, 0)


def test_equal_scores_come_by_ascending_id_across_the_kth_place(target: str) -> None:
    """13 copies of one vector among 30 others: the top 5 are the 5 lowest ids of the copies
    (Milvus orders ties as it likes; the backend searches past them)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((43, 16)).astype(np.float32)
    x[30:] = x[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(100, 143))
    spec = parse_backend(target)
    with MilvusBackend.connect(spec, 16, create=choose_index(len(x))) as backend:
        rows = [
            backend.row(int(i), ItemRecord(f"/{i}.jpg", "a"), v, "now")
            for i, v in zip(ids, x, strict=True)
        ]
        backend._client.insert(spec.collection, rows)
        copies = np.sort(ids[[0, *range(30, 43)]])
        for k in (1, 5, 13, 14):
            scores, found = backend.search(x[:1], k)
            np.testing.assert_array_equal(found[0], copies[:k])
            np.testing.assert_allclose(scores[0], 1.0, atol=1e-5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["milvus-lite-server", "milvus-server"])
def milvus_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A Milvus Lite server in its own process, or the session's Milvus server; yields the
    ``milvus://127.0.0.1:PORT/`` that names a fresh collection with a suffix."""
    if request.param == "milvus-server":
        address = request.getfixturevalue("milvus_standalone")
        yield fresh_collection(address, collection_name(request))
        return
    pytest.importorskip("milvus_lite", reason="the milvus extra (milvus-lite) is not installed")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "milvus_lite",
            "server",
            "--data-dir",
            str(tmp_path / "srv"),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "the Milvus Lite server stopped"
                assert time.monotonic() < deadline, "the Milvus Lite server did not start"
                time.sleep(0.2)
        yield f"milvus://127.0.0.1:{port}/items"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_writes_through_one_service_are_seen_by_another(
    bundle_copy: Path, milvus_server: str
) -> None:
    """Two services (as two replicas of retrieval serve) on one engine."""
    spec = milvus_server
    push_bundle(bundle_copy, parse_backend(spec))
    (new,) = new_images(bundle_copy.parent / "incoming", 1)
    first = make_client(bundle_copy, spec, token=TOKEN)
    second = make_client(bundle_copy, spec, token=TOKEN)
    a: TestClient = next(first)
    b: TestClient = next(second)
    try:
        reply = a.post("/items", files={"images": (new.name, new.read_bytes())}, headers=AUTH)
        assert reply.status_code == 201, reply.text
        new_id = reply.json()["added"][0]["id"]
        assert new_id > 40 and new_id < 2**53
        assert b.get("/healthz").json()["items"] == 41
        found = b.post("/search", files={"image": ("q.jpg", new.read_bytes())}, params={"k": 1})
        assert found.json()["results"][0]["id"] == new_id
        again = b.post("/items", files={"images": (new.name, new.read_bytes())}, headers=AUTH)
        assert again.status_code == 200 and again.json()["duplicates"][0]["id"] == new_id
        assert b.delete(f"/items/{new_id}", headers=AUTH).status_code == 200
        assert a.get(f"/items/{new_id}").status_code == 404
        assert a.get("/healthz").json()["items"] == 40
        assert a.delete("/items/3", headers=AUTH).status_code == 200
        assert b.get("/items/3").status_code == 404
    finally:
        for client in (first, second):
            client.close()


PUSH_SLOWLY = """
import sys, time
from retrieval.backends import milvus
insert = milvus.MilvusBackend.connect
def slow_connect(*args, **kwargs):
    backend = insert(*args, **kwargs)
    client = backend._client
    real = client.upsert
    def write_then_wait(name, rows):
        out = real(name, rows)
        print("batch", len(rows), flush=True)
        time.sleep(0.5)
        return out
    client.upsert = write_then_wait
    return backend
milvus.MilvusBackend.connect = slow_connect
from retrieval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_push_killed_midway_and_run_again_gives_every_item_once(
    bundle_copy: Path, target: str
) -> None:
    push = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PUSH_SLOWLY,
            "push",
            str(bundle_copy),
            target,
            "--batch-size",
            "6",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert push.stdout is not None
    batches = [push.stdout.readline() for _ in range(2)]
    assert all(line.startswith("batch 6") for line in batches), batches
    push.kill()  # SIGKILL between two batches: no clean-up runs
    push.wait(timeout=30)
    assert push.returncode == -9
    report = push_bundle(bundle_copy, parse_backend(target))
    assert report.present >= 12 and report.pushed == 40 - report.present
    assert report.total == 40
    with MilvusBackend.connect(parse_backend(target), 1280) as backend:
        rows = backend._client.query(
            backend.spec.collection, filter="id >= 0", output_fields=["id"], limit=1000
        )
        assert sorted(int(r["id"]) for r in rows) == list(range(1, 41))
    again = push_bundle(bundle_copy, parse_backend(target))
    assert (again.pushed, again.present, again.total) == (0, 40, 40)


def test_push_deletes_items_removed_from_the_bundle(bundle_copy: Path, pushed: str) -> None:
    with Retriever.load(bundle_copy) as bundle:
        bundle.remove([4, 5])
    report = push_bundle(bundle_copy, parse_backend(pushed))
    assert (report.deleted, report.pushed, report.total) == (2, 0, 38)


def test_unreachable_engine_wrong_dimension_and_missing_collection(
    bundle_copy: Path, pushed: str, tmp_path: Path
) -> None:
    with pytest.raises(
        BackendError, match=r"cannot reach Milvus for collection 'x' on http://127.0.0.1:1"
    ):
        MilvusBackend.connect(parse_backend("milvus://127.0.0.1:1/x"), 1280, timeout_s=2)
    with pytest.raises(
        BackendError, match=r"holds 1280-d vectors but the bundle's model gives 64-d"
    ):
        MilvusBackend.connect(parse_backend(pushed), 64)
    other = f"{pushed}#other" if pushed.startswith("milvus-lite:") else f"{pushed}_other"
    with pytest.raises(BackendError, match=r"no collection '.*other'.*retrieval push"):
        Retriever.load(bundle_copy, backend=other)


def test_cli_push_and_serve_errors(bundle_copy: Path, target: str, capsys) -> None:
    from retrieval.cli import main

    assert main(["push", str(bundle_copy), target, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "pushed 40, already there 0, deleted 0" in out and "holds 40 items (HNSW" in out
    assert main(["push", str(bundle_copy), target, "--quiet"]) == 0
    assert "pushed 0, already there 40" in capsys.readouterr().out
    assert main(["serve", str(bundle_copy), "--backend", "milvus://nowhere/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: backend 'milvus://nowhere/x'") and "\n" not in err


def test_index_choice_grows_with_the_bundle() -> None:
    assert choose_index(40).index_type == "HNSW" and choose_index(40).params["M"] == 16
    assert choose_index(1_000_000).params["M"] == 32
    big = choose_index(10_000_000)
    assert big.index_type == "IVF_FLAT" and big.params["nlist"] == 16384
    assert big.search["nprobe"] == 256


def test_two_serve_processes_on_one_engine_share_writes(
    bundle_copy: Path, milvus_server: str
) -> None:
    """Two real `retrieval serve --backend milvus://...` processes on one bundle folder (the
    folder is not held: the engine has the items) and one Milvus Lite server."""
    import httpx

    from tests.service.live import serve

    spec = milvus_server
    push_bundle(bundle_copy, parse_backend(spec))
    (new,) = new_images(bundle_copy.parent / "incoming", 1, seed=11)
    flags = ("--backend", spec, "--token", TOKEN)
    with serve(bundle_copy, *flags) as one, serve(bundle_copy, *flags) as two:
        collection = parse_backend(spec).collection
        assert httpx.get(f"{two}/stats").json()["backend"]["collection"] == collection
        reply = httpx.post(
            f"{one}/items", files={"images": (new.name, new.read_bytes())}, headers=AUTH
        )
        assert reply.status_code == 201, reply.text
        new_id = reply.json()["added"][0]["id"]
        found = httpx.post(
            f"{two}/search", files={"image": ("q.jpg", new.read_bytes())}, params={"k": 1}
        ).json()["results"]
        assert found[0]["id"] == new_id
        assert httpx.delete(f"{two}/items/{new_id}", headers=AUTH).status_code == 200
        assert httpx.get(f"{one}/items/{new_id}").status_code == 404
        assert httpx.get(f"{one}/healthz").json()["items"] == 40


def test_push_keeps_extra_fields_labels_and_hashes(
    bundle_copy: Path, gallery: Gallery, target: str
) -> None:
    from retrieval.backends import SearchBackend
    from retrieval.bundle.items import IndexedItems
    from retrieval.bundle.records import ItemRecord

    extra = {"sku": "A-1", "sizes": [38, 39], "note": 'quote " and \\ backslash'}
    with IndexedItems.open(bundle_copy) as items:
        record = ItemRecord("/shop/a1.jpg", "shoes", extra, "ab" * 32)
        (new_id,) = items.add([record], gallery.vectors[:1]).added
        unlabelled = items.add([ItemRecord("/shop/x.jpg")], gallery.vectors[1:2]).added[0]
    push_bundle(bundle_copy, parse_backend(target))
    with Retriever.load(bundle_copy) as bundle, Retriever.load(bundle_copy, backend=target) as mv:
        assert isinstance(bundle.items, SearchBackend) and isinstance(mv.items, SearchBackend)
        for item_id in (new_id, unlabelled):
            a, b = bundle.item(item_id), mv.item(item_id)
            assert (b.uri, b.label, b.extra, b.content_sha256, b.added_at) == (
                a.uri,
                a.label,
                a.extra,
                a.content_sha256,
                a.added_at,
            )
        assert mv.item(new_id).extra == extra and mv.item(unlabelled).label is None
        assert mv.items.find_by_sha256("AB" * 32) == [new_id]
        hits = mv.search(gallery.vectors[:1], k=3, label="shoes")[0]
        assert [(h.id, h.extra) for h in hits] == [(new_id, extra)]

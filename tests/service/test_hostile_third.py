"""Hostile and failing requests: slow bodies, a full disk, errors on a kept-alive connection,
refusals counted under their route, long labels, unauthenticated uploads, bad listen
addresses. Some run the app under uvicorn in a thread, to see real connections."""

from __future__ import annotations

import asyncio
import errno
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from retrieval.search import Retriever
from retrieval.service import ServiceSettings, create_app
from tests.bundle_fixtures import Gallery, new_images
from tests.service.conftest import AUTH, TOKEN, make_client
from tests.service.live import free_port


@contextmanager
def running(bundle: Path, **settings: Any) -> Iterator[tuple[str, FastAPI]]:
    """The service over ``bundle`` served by uvicorn in a thread: its base URL and its app."""
    retriever = Retriever.load(bundle)
    app = create_app(retriever, ServiceSettings(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        until = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < until, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        retriever.close()


def trickling(base: str, length: int = 4096) -> socket.socket:
    """A connection that has sent the headers of a ``POST /search`` of ``length`` bytes and
    the first 16 bytes of its body."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /search HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\n"
        b"Content-Length: %d\r\n\r\n--xyz\r\nContent-D" % length
    )
    return sock


def query(gallery: Gallery, i: int = 0) -> dict[str, Any]:
    return {"image": ("q.jpg", gallery.paths[i].read_bytes(), "image/jpeg")}


# slow bodies -------------------------------------------------------------------------------
@pytest.mark.slow
def test_slow_bodies_do_not_take_the_upload_slots(bundle_copy: Path, gallery: Gallery) -> None:
    """As many slow uploads as ``max_requests`` are still arriving: a normal search passes.
    The bodies arriving are bounded on their own (``max_receiving``): one more gets 503."""
    with running(bundle_copy, max_requests=2, max_receiving=3) as (base, _):
        slow = [trickling(base) for _ in range(2)]
        try:
            time.sleep(0.5)  # both are in the server, sending
            reply = httpx.post(f"{base}/search", files=query(gallery), timeout=30)
            assert reply.status_code == 200, reply.text
            slow.append(trickling(base))
            time.sleep(0.5)
            assert httpx.get(f"{base}/stats").json()["uploads"]["receiving"] == 3
            reply = httpx.post(f"{base}/search", files=query(gallery, 1), timeout=30)
            assert reply.status_code == 503 and "3 uploads arriving" in reply.json()["detail"]
        finally:
            for sock in slow:
                sock.close()


def _reply_while_trickling(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Send 16 bytes every 0.1 s until the server answers (or ``seconds`` pass)."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < seconds:
        with suppress(OSError):  # the server may have answered and closed already
            sock.sendall(b"x" * 16)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        took = time.monotonic() - start
        return data + _rest_of_reply(sock), took
    return b"", time.monotonic() - start


def _rest_of_reply(sock: socket.socket) -> bytes:
    """What the server sends after the first packet of its reply, until it closes (a reply
    with ``Connection: close``) or 2 s pass."""
    sock.settimeout(2.0)
    rest = b""
    with suppress(OSError):  # TimeoutError included
        while chunk := sock.recv(65536):
            rest += chunk
    return rest


@pytest.mark.slow
def test_a_body_under_the_minimum_rate_gets_408_and_gives_its_slot_back(
    bundle_copy: Path, gallery: Gallery
) -> None:
    settings = {"max_requests": 1, "body_grace_s": 0.5, "body_min_rate": 1024}
    with running(bundle_copy, **settings) as (base, _):
        with trickling(base) as sock:
            reply, took = _reply_while_trickling(sock, 5.0)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
        assert b"bytes/s" in reply and b"connection: close" in reply.lower()
        assert took < 2.0, f"answered after {took:.2f} s; the grace is 0.5 s"
        uploads = httpx.get(f"{base}/stats").json()["uploads"]
        assert uploads["receiving"] == 0 and uploads["in_flight"] == 0, uploads
        assert httpx.post(f"{base}/search", files=query(gallery), timeout=30).status_code == 200
        routes = httpx.get(f"{base}/stats").json()["routes"]
        assert routes["/search"]["by_status"] == {"200": 1, "408": 1}, routes


def test_refusals_of_the_guard_are_counted_under_their_route(
    bundle_copy: Path, gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A received upload holds one of ``max_requests``; the next one gets 503 at once; both
    that 503 and a 413 from the headers alone count under ``/search``."""
    from retrieval.data.preprocessing import Preprocessing
    from tests.service.test_api import _slow

    for client in make_client(bundle_copy, max_requests=1, max_body_bytes=1024 * 1024):
        _slow(monkeypatch, Preprocessing, "prepare", 1.5)
        first: list[int] = []

        def send_first(c: TestClient = client, got: list[int] = first) -> None:
            got.append(c.post("/search", files=query(gallery)).status_code)

        worker = threading.Thread(target=send_first)
        worker.start()
        lane = client.app.state.service.small  # type: ignore[attr-defined]
        while lane.busy == 0 and worker.is_alive():
            time.sleep(0.01)
        refused = client.post("/search", files=query(gallery, 1))
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        worker.join()
        assert first == [200]
        big = client.post("/search", content=b"x" * (1024 * 1024 + 1))
        assert big.status_code == 413
        routes = client.get("/stats").json()["routes"]
        assert "(unmatched)" not in routes, routes
        assert routes["/search"]["by_status"] == {"200": 1, "413": 1, "503": 1}, routes


# errors ------------------------------------------------------------------------------------
def test_a_500_is_json_and_closes_the_connection(
    bundle_copy: Path, gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    retriever = Retriever.load(bundle_copy)
    try:
        monkeypatch.setattr(retriever, "item", lambda _: 1 / 0)
        app = create_app(retriever, ServiceSettings())
        with TestClient(app, raise_server_exceptions=False) as client:
            reply = client.get("/items/1")
            assert reply.status_code == 500 and reply.headers["connection"] == "close"
            assert "internal error" in reply.json()["detail"]
    finally:
        retriever.close()


@pytest.mark.slow
def test_the_request_after_a_500_on_a_kept_alive_connection_works(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running(bundle_copy) as (base, app):
        retriever = app.state.service.retriever
        monkeypatch.setattr(retriever, "item", lambda _: 1 / 0)
        with httpx.Client(base_url=base, timeout=10) as http:
            for _ in range(20):
                assert http.get("/items/1").status_code == 500
                assert http.get("/healthz").status_code == 200


def _full_disk(client: TestClient) -> sqlite3.Connection:
    """The item table's connection, limited to the pages it has: the next insert finds the
    disk full (SQLITE_FULL), as a real full disk does."""
    conn: sqlite3.Connection = client.app.state.service.retriever.items._store._conn  # type: ignore[attr-defined]
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    return conn


def test_a_full_disk_answers_507_names_the_cause_and_loses_nothing(
    bundle_copy: Path, tmp_path: Path
) -> None:
    paths = new_images(tmp_path / "new", 3, seed=11)
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    for client in make_client(bundle_copy, token=TOKEN):
        conn = _full_disk(client)
        reply = client.post("/items", files=files, headers=AUTH)
        assert reply.status_code == 507, reply.text
        detail = reply.json()["detail"]
        assert "database or disk is full" in detail and "cannot rollback" not in detail
        assert client.get("/healthz").json()["items"] == 40
        assert not [p for p in (bundle_copy / "uploads").glob("*") if p.is_file()]
        conn.execute("PRAGMA max_page_count = 1073741823")  # space again
        reply = client.post("/items", files=files, headers=AUTH)
        assert reply.status_code == 201, reply.text
        assert client.get("/healthz").json()["items"] == 43


def test_the_item_table_raises_a_full_disk_as_enospc(tmp_path: Path) -> None:
    import numpy as np

    from retrieval.bundle.item_table import ItemTable
    from retrieval.bundle.records import ItemRecord

    vector = np.ones((1, 4), dtype=np.float32) / 2
    with ItemTable.create(tmp_path / "items.sqlite", 4) as table:
        (pages,) = table._conn.execute("PRAGMA page_count").fetchone()
        table._conn.execute(f"PRAGMA max_page_count = {pages}")
        records = [ItemRecord(uri=f"/x/{i}.jpg", extra={"pad": "p" * 3000}) for i in range(4)]
        with pytest.raises(OSError) as full:
            table.add(records, np.repeat(vector, 4, axis=0))
        assert full.value.errno == errno.ENOSPC
        assert "database or disk is full" in str(full.value) and "items.sqlite" in str(full.value)
        assert isinstance(full.value.__cause__, sqlite3.OperationalError)
        table._conn.execute("PRAGMA max_page_count = 1073741823")
        assert table.add(records[:1], vector) == [1]


# labels and writes -------------------------------------------------------------------------
@pytest.mark.parametrize("letter", ["L", "\U0001f600"])  # 1 and 4 bytes in UTF-8
def test_labels_as_long_as_the_store_takes_can_be_filtered_on(
    client: TestClient, bundle_copy: Path, tmp_path: Path, letter: str
) -> None:
    from retrieval.bundle.records import MAX_LABEL

    (path,) = new_images(tmp_path / "new", 1, seed=12)
    label = letter * MAX_LABEL
    files = {"images": (path.name, path.read_bytes(), "image/jpeg")}
    added = client.post("/items", files=files, data={"labels": label}, headers=AUTH)
    assert added.status_code == 201, added.text
    item = added.json()["added"][0]["id"]
    image = {"image": (path.name, path.read_bytes(), "image/jpeg")}
    found = client.post("/search", files=image, params={"label": label})
    assert found.status_code == 200, found.text
    assert [h["id"] for h in found.json()["results"]] == [item]
    too_long = client.post("/search", files=image, params={"label": label + "L"})
    assert too_long.status_code == 422
    longer = client.post("/items", files=files, data={"labels": label + "L"}, headers=AUTH)
    assert longer.status_code in (200, 422)  # the same image: a duplicate, or refused


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(bundle_copy: Path) -> None:
    size, chunk = 15 * 1024 * 1024, 64 * 1024
    head = b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n'
    tail = b"\r\n--xyz--\r\n"
    sent = [0]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if sent[0] >= size:
            await asyncio.sleep(3600)  # the client waits for the answer
        body = head if sent[0] == 0 else b"\xff" * min(chunk, size - sent[0] - len(tail))
        if sent[0] + len(body) + len(tail) >= size:
            body += tail
        sent[0] += len(body)
        return {"type": "http.request", "body": body, "more_body": sent[0] < size}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    headers = [
        (b"host", b"test"),
        (b"content-type", b"multipart/form-data; boundary=xyz"),
        (b"content-length", str(size).encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/items",
        "raw_path": b"/items",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    retriever = Retriever.load(bundle_copy)
    try:
        app = create_app(retriever, ServiceSettings(token=TOKEN))
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    finally:
        retriever.close()
    assert messages[0]["status"] == 401
    assert sent[0] < 1024 * 1024, f"{sent[0]:,} bytes read before the 401"


# the command -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--port", "99999"], "--port"),
        (["--port", "0"], "--port"),
        (["--host", "no-such-host.invalid"], "no-such-host.invalid"),
    ],
)
def test_serve_checks_where_it_listens_before_loading(
    options: list[str], words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import retrieval.cli.serve as serve_command
    from retrieval.cli import main

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bundle was loaded")

    monkeypatch.setattr(serve_command, "load", loaded)
    assert main(["serve", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_serve_reports_a_port_in_use_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import retrieval.cli.serve as serve_command
    from retrieval.cli import main

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bundle was loaded")

    monkeypatch.setattr(serve_command, "load", loaded)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(port) in err, err

"""``retrieval serve`` as a real server on loopback: body limits enforced while the body is
still streaming, and searches running while items are added."""

from __future__ import annotations

import select
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.bundle_fixtures import Gallery, new_images
from tests.service.conftest import TOKEN
from tests.service.live import memory_of, serve

LIMIT = 1024 * 1024  # --max-upload-mb 1


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (it answers 413 with
    ``connection: close``); headers and body may come in separate segments."""
    reply = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return reply
        if not data:
            return reply
        reply += data


def _head(content: str) -> bytes:
    return (
        "POST /search HTTP/1.1\r\nHost: test\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n" + content + "\r\n"
    ).encode()


@pytest.mark.slow
def test_too_large_bodies_are_refused_before_they_are_read(bundle_copy: Path) -> None:
    with serve(bundle_copy, "--max-upload-mb", "1") as base:
        # Declared too large: answered from the headers alone, no body byte sent.
        with _connect(base) as sock:
            sock.sendall(_head(f"Content-Length: {100 * LIMIT}\r\n"))
            reply = _read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"over the limit of 1048576 bytes" in reply

        # Streamed (chunked, no length): answered once the limit is passed, mid-body.
        sent, reply = 0, b""
        with _connect(base) as sock:
            sock.sendall(_head("Transfer-Encoding: chunked\r\n"))
            part = b"--xyz\r\nContent-Disposition: form-data; name=image; filename=a.jpg\r\n\r\n"
            chunk = part + b"\xff" * (64 * 1024 - len(part))
            try:
                while sent < 8 * LIMIT and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    chunk = b"\xff" * len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = _read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"over the limit" in reply
        assert sent < 8 * LIMIT  # it read at most DRAIN_BYTES past the limit, then answered
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_urllib_reads_the_413_of_a_body_over_the_limit(bundle_copy: Path) -> None:
    """urllib sends the whole body before it reads the answer: the server reads and discards
    the rest (bounded) before answering, so the client sees 413, not a broken pipe."""
    import urllib.error
    import urllib.request

    with serve(bundle_copy, "--max-upload-mb", "1") as base:
        for size in (2 * LIMIT, LIMIT + 1):
            body = b"--xyz\r\nContent-Disposition: form-data; name=image; filename=a.jpg\r\n\r\n"
            body += b"\xff" * (size - len(body))
            request = urllib.request.Request(
                f"{base}/search",
                data=body,
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 413
            assert b"over the limit" in refused.value.read()
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"


def near_limit_png(side: int) -> bytes:
    """An RGBA PNG of side x side pixels (4 bytes each once decoded) that compresses to
    almost nothing: the cheapest upload for the most decoding."""
    import io

    image = Image.new("RGBA", (side, side), (30, 120, 200, 128))
    image.paste((200, 40, 40, 255), (0, 0, side // 4, side // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


@pytest.mark.slow
def test_a_flood_of_near_limit_pngs_keeps_the_server_memory_bounded(
    bundle_copy: Path, gallery: Gallery
) -> None:
    """16 parallel uploads of images just under the pixel limit: the server's peak memory
    stays within the decode budget (slots x a decode's worst case over its baseline); what
    the queue cannot hold gets 503 + Retry-After at once; nothing fails otherwise."""
    from retrieval.service.budget import WORST_BYTES_PER_PIXEL

    side, slots = 3400, 2
    png = near_limit_png(side)
    options = ["--max-pixels", str(side * side + 1), "--decode-slots", str(slots)]
    with serve(bundle_copy, *options, "--decode-queue", "4", "--timeout", "60") as base:
        warm = {"image": ("q.jpg", gallery.paths[0].read_bytes(), "image/jpeg")}
        assert httpx.post(f"{base}/search", files=warm, timeout=60).status_code == 200
        before = memory_of(base.pid)

        def upload(i: int) -> httpx.Response:
            data = png + b"%d" % i  # bytes after IEND: a distinct upload, the same image
            files = {"image": (f"big{i}.png", data, "image/png")}
            return httpx.post(f"{base}/search", files=files, timeout=120)

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(upload, range(16)))
        after = memory_of(base.pid)
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) <= {200, 503}, [r.text for r in replies if r.status_code != 200]
        assert statuses.count(200) >= slots and 503 in statuses
        assert all(int(r.headers["retry-after"]) >= 1 for r in replies if r.status_code == 503)
        budget = slots * WORST_BYTES_PER_PIXEL * side * side + (64 << 20)
        grew = after["VmHWM"] - max(before["VmHWM"], before["VmRSS"])
        assert grew <= budget, f"peak grew {grew >> 20} MiB, budget {budget >> 20} MiB"
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_searches_while_items_are_added(bundle_copy: Path, gallery: Gallery) -> None:
    new = new_images(bundle_copy.parent / "incoming", 8, seed=11)
    errors: list[str] = []
    added: dict[Path, int] = {}
    adding_done = threading.Event()

    with serve(bundle_copy, env={"RETRIEVAL_TOKEN": TOKEN}) as base:

        def searcher(worker: int) -> int:
            done = 0
            with httpx.Client(base_url=base, timeout=60) as client:
                while not adding_done.is_set() or done < 10:
                    i = (worker * 7 + done) % len(gallery.paths)
                    files = {"image": ("q.jpg", gallery.paths[i].read_bytes(), "image/jpeg")}
                    reply = client.post("/search", files=files, params={"k": 3})
                    if reply.status_code != 200:
                        errors.append(f"search {reply.status_code}: {reply.text}")
                    elif reply.json()["results"][0]["label"] != gallery.labels[i]:
                        errors.append(f"search {i}: wrong first result {reply.json()}")
                    done += 1
            return done

        def writer() -> None:
            try:
                with httpx.Client(base_url=base, timeout=60) as client:
                    auth = {"Authorization": f"Bearer {TOKEN}"}
                    for path in new:
                        files = {"images": (path.name, path.read_bytes(), "image/jpeg")}
                        reply = client.post("/items", files=files, headers=auth)
                        if reply.status_code != 201:
                            errors.append(f"add {reply.status_code}: {reply.text}")
                        else:
                            added[path] = reply.json()["added"][0]["id"]
            finally:
                adding_done.set()

        with ThreadPoolExecutor(5) as pool:
            searches = [pool.submit(searcher, w) for w in range(4)]
            pool.submit(writer).result()
            total = sum(f.result() for f in searches)

        assert not errors, errors[:5]
        assert total >= 40 and len(added) == len(new)
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.get("/healthz").json()["items"] == len(gallery.paths) + len(new)
            for path, item_id in added.items():
                files = {"image": ("q.jpg", path.read_bytes(), "image/jpeg")}
                top = client.post("/search", files=files, params={"k": 1}).json()["results"][0]
                assert top["id"] == item_id and top["score"] == pytest.approx(1.0, abs=1e-4)
            stats = client.get("/stats").json()
            assert stats["routes"]["/search"]["by_status"].keys() == {"200"}
            assert stats["routes"]["/items"]["by_status"] == {"201": len(new)}


def _readme_lines(prefix: str) -> list[str]:
    from tests.documents import bash_lines

    return [line for line in bash_lines() if prefix in line]


def test_readme_serve_commands_parse() -> None:
    import shlex

    from retrieval.cli import build_parser

    commands = _readme_lines("retrieval serve ")
    assert len(commands) >= 2
    for command in commands:
        words = [w for w in shlex.split(command) if "=" not in w.split("/")[0]]
        args = build_parser().parse_args(words[words.index("retrieval") + 1 :])
        assert args.command == "serve"


@pytest.mark.slow
def test_readme_curl_examples_work(bundle_copy: Path, gallery: Gallery, tmp_path: Path) -> None:
    import shlex
    import subprocess

    curls = _readme_lines("curl ")
    assert any("/search" in c for c in curls) and any("DELETE" in c for c in curls)
    (tmp_path / "query.jpg").write_bytes(gallery.paths[6].read_bytes())
    (tmp_path / "new.jpg").write_bytes(new_images(tmp_path / "src", 1, seed=21)[0].read_bytes())
    token = shlex.split(next(c for c in _readme_lines("RETRIEVAL_TOKEN=")))[0].split("=", 1)[1]
    with serve(bundle_copy, env={"RETRIEVAL_TOKEN": token}) as base:
        for command in curls:
            words = shlex.split(command.replace("http://127.0.0.1:8000", base))
            done = subprocess.run(
                [words[0], "--fail-with-body", "-sS", *words[1:]],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert Image.open(tmp_path / "item7.jpg").format == "JPEG"
        stats = httpx.get(f"{base}/stats").json()
        assert stats["items"] == len(gallery.paths)  # one added, item 7 removed
        assert stats["routes"]["/items"]["by_status"] == {"201": 1}

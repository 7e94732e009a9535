"""Every endpoint of the service, and every kind of bad request, through an in-process client."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.bundle_fixtures import Gallery, transformed_copy
from tests.service.conftest import AUTH, TOKEN, jpeg_bytes, make_client, png_bytes


def search(client: TestClient, data: bytes, name: str = "query.jpg", **params: object):
    return client.post("/search", files={"image": (name, data, "image/jpeg")}, params=params)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def first_id(client: TestClient, data: bytes) -> int:
    response = search(client, data, k=1)
    assert response.status_code == 200, response.text
    return int(response.json()["results"][0]["id"])


def test_search_finds_the_image_itself_first_with_its_record(
    client: TestClient, gallery: Gallery
) -> None:
    response = search(client, gallery.paths[5].read_bytes(), k=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 4 and len(body["results"]) == 4 and body["took_ms"] > 0
    top = body["results"][0]
    assert top["label"] == gallery.labels[5] and top["name"] == gallery.paths[5].name
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["thumbnail"] == f"/items/{top['id']}/thumbnail"
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert str(gallery.root) not in response.text  # server paths are not given away


def test_search_matches_the_retriever_and_finds_an_edited_copy(
    client: TestClient, gallery: Gallery
) -> None:
    retriever = client.app.state.service.retriever  # type: ignore[attr-defined]
    copy = transformed_copy(gallery.paths[9])
    expected = retriever.search([copy], k=5)[0]
    got = search(client, copy, k=5).json()["results"]
    assert [h["id"] for h in got] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in expected], atol=1e-5)
    assert got[0]["label"] == gallery.labels[9]


def test_label_filter_and_k(client: TestClient, gallery: Gallery) -> None:
    label = gallery.labels[0]
    body = search(client, gallery.paths[20].read_bytes(), k=10, label=label).json()
    assert len(body["results"]) == 4  # the label's four images, nothing else
    assert {hit["label"] for hit in body["results"]} == {label}
    assert search(client, gallery.paths[0].read_bytes(), k=100).json()["results"].__len__() == 40
    assert search(client, gallery.paths[0].read_bytes(), label="no-such").json()["results"] == []


def test_identical_uploads_are_embedded_once(client: TestClient, gallery: Gallery) -> None:
    data = gallery.paths[3].read_bytes()
    first, second = search(client, data).json(), search(client, data).json()
    assert first["results"] == second["results"]
    cache = client.get("/stats").json()["cache"]
    assert cache == {"hits": 1, "misses": 1}


def test_item_record_similar_and_thumbnail(client: TestClient, gallery: Gallery) -> None:
    item_id = first_id(client, gallery.paths[7].read_bytes())
    record = client.get(f"/items/{item_id}").json()
    assert record["id"] == item_id and record["label"] == gallery.labels[7]
    assert record["name"] == gallery.paths[7].name and "added_at" in record
    similar = client.get(f"/items/{item_id}/similar", params={"k": 3}).json()["results"]
    assert similar[0]["id"] == item_id and len(similar) == 3
    response = client.get(f"/items/{item_id}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    original = Image.open(gallery.paths[7]).convert("RGB").resize(thumb.size)
    diff = np.abs(np.asarray(thumb.convert("RGB"), float) - np.asarray(original, float)).mean()
    assert diff < 12, diff  # the item's own picture, not another one


def test_thumbnail_of_an_item_whose_file_is_gone(client: TestClient, gallery: Gallery) -> None:
    item_id = first_id(client, gallery.paths[11].read_bytes())
    moved = gallery.paths[11].with_suffix(".moved")
    gallery.paths[11].rename(moved)
    try:
        response = client.get(f"/items/{item_id}/thumbnail")
    finally:
        moved.rename(gallery.paths[11])
    assert response.status_code == 404 and "not available" in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/items/999999",
        "/items/-1",
        "/items/1.5",
        "/items/abc",
        "/items/..%2F..%2Fetc%2Fpasswd",
        "/items/%2e%2e/%2e%2e/etc/passwd",
        "/items/../../etc/passwd",
        "/items/1/../../../etc/passwd/thumbnail",
        "/items/%2Fetc%2Fpasswd/thumbnail",
        "/items/99999999999999999999999/thumbnail",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_unknown_and_path_like_ids_are_4xx_json(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert 400 <= response.status_code < 500, (path, response.status_code)
    assert "root:" not in response.text
    if not path.startswith("/static"):
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"]


def test_bad_uploads_get_a_clear_4xx(client: TestClient, gallery: Gallery) -> None:
    good = gallery.paths[0].read_bytes()
    big_image = png_bytes(Image.new("RGB", (2500, 2000), "white"))  # 5 MP > the 4 MP limit
    cases = {
        "empty file": (search(client, b""), 400, "empty"),
        "not an image": (search(client, b"just some text\n" * 20, "x.jpg"), 415, "JPEG, PNG"),
        "html named .png": (search(client, b"<html></html>", "x.png"), 415, "judged by its bytes"),
        "truncated jpeg": (search(client, good[: len(good) * 2 // 3]), 422, "cannot be read"),
        "over the pixel limit": (search(client, big_image, "big.png"), 413, "over the limit"),
        "decompression bomb": (search(client, png_header(60_000, 60_000)), 413, "pixel"),
        "huge upload": (search(client, b"\xff\xd8\xff" + b"0" * (3 * 1024 * 1024)), 413, "bytes"),
        "k too large": (search(client, good, k=101), 422, ""),
        "k zero": (search(client, good, k=0), 422, ""),
        "k not a number": (search(client, good, k="ten"), 422, ""),
        "no file field": (client.post("/search"), 422, ""),
        "json body": (client.post("/search", json={"image": "x"}), 422, ""),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", name
        detail = response.json()["detail"]
        assert detail and (not words or words in str(detail)), (name, detail)
    # a PNG named .jpg is judged by its bytes and accepted
    as_png = png_bytes(Image.open(gallery.paths[2]).convert("RGB"))
    top = search(client, as_png, "photo.jpg").json()["results"][0]
    assert top["name"] == gallery.paths[2].name and top["label"] == gallery.labels[2]
    assert client.get("/healthz").json()["status"] == "ok"  # nothing broke


def test_writes_need_the_token(client: TestClient, gallery: Gallery, tmp_path: Path) -> None:
    files = {"images": ("new.jpg", jpeg_bytes(Image.new("RGB", (64, 64), "red")), "image/jpeg")}
    for headers in ({}, {"Authorization": "Bearer wrong-token!"}, {"Authorization": TOKEN}):
        response = client.post("/items", files=files, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert client.delete("/items/1", headers=headers).status_code == 401
    assert client.get("/healthz").json()["items"] == 40


def test_writes_are_disabled_without_a_token(read_only_client: TestClient) -> None:
    files = {"images": ("new.jpg", jpeg_bytes(Image.new("RGB", (64, 64))), "image/jpeg")}
    response = read_only_client.post("/items", files=files, headers=AUTH)
    assert response.status_code == 403 and "--token" in response.json()["detail"]
    assert read_only_client.delete("/items/1", headers=AUTH).status_code == 403
    assert read_only_client.get("/stats").json()["writes_enabled"] is False


def test_add_search_and_remove_items(client: TestClient, bundle_copy: Path) -> None:
    from tests.bundle_fixtures import new_images

    paths = new_images(bundle_copy.parent / "incoming", 3)
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.append(("images", ("notes.jpg", b"not an image at all", "image/jpeg")))
    response = client.post("/items", files=files, data={"labels": "fresh"}, headers=AUTH)
    assert response.status_code == 201, response.text
    body = response.json()
    assert [a["name"] for a in body["added"]] == [p.name for p in paths]
    assert body["rejected"][0]["name"] == "notes.jpg" and body["items"] == 43
    new_id = body["added"][1]["id"]
    assert first_id(client, paths[1].read_bytes()) == new_id
    assert client.get(f"/items/{new_id}").json()["label"] == "fresh"
    assert client.get(f"/items/{new_id}/thumbnail").status_code == 200
    stored = list((bundle_copy / "uploads").iterdir())
    assert len(stored) == 3 and all(p.suffix == ".jpg" for p in stored)

    again = client.post("/items", files=files[:1], headers=AUTH)
    assert (
        again.status_code == 200 and again.json()["duplicates"][0]["id"] == body["added"][0]["id"]
    )
    assert len(list((bundle_copy / "uploads").iterdir())) == 3

    removed = client.delete(f"/items/{new_id}", headers=AUTH)
    assert removed.status_code == 200 and removed.json() == {"removed": new_id, "items": 42}
    assert client.get(f"/items/{new_id}").status_code == 404
    assert client.delete(f"/items/{new_id}", headers=AUTH).status_code == 404
    assert new_id not in [
        h["id"] for h in search(client, paths[1].read_bytes(), k=5).json()["results"]
    ]
    assert len(list((bundle_copy / "uploads").iterdir())) == 2  # its stored file went with it


def test_add_rejects_bad_batches(client: TestClient) -> None:
    image = jpeg_bytes(Image.new("RGB", (64, 64), "blue"))
    files = [("images", (f"{i}.jpg", image, "image/jpeg")) for i in range(3)]
    response = client.post("/items", files=files, data={"labels": ["a", "b"]}, headers=AUTH)
    assert response.status_code == 422 and "2 labels for 3 images" in response.json()["detail"]
    only_bad = client.post(
        "/items", files={"images": ("x.jpg", b"\x00" * 100, "image/jpeg")}, headers=AUTH
    )
    assert only_bad.status_code == 422 and "no image was added" in only_bad.json()["detail"]
    many = [("images", (f"{i}.jpg", image, "image/jpeg")) for i in range(33)]
    assert client.post("/items", files=many, headers=AUTH).status_code == 413
    assert client.get("/healthz").json()["items"] == 40


def test_stats_and_schema(client: TestClient, gallery: Gallery) -> None:
    for path in gallery.paths[:3]:
        search(client, path.read_bytes())
    client.get("/items/999999")
    stats = client.get("/stats").json()
    assert stats["items"] == 40 and stats["dim"] == 1280 and stats["index"]["factory"] == "Flat"
    routes = stats["routes"]
    assert routes["/search"]["by_status"] == {"200": 3}
    assert routes["/items/{item_id}"]["by_status"] == {"404": 1}
    latency = routes["/search"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    assert stats["batching"]["queries"] == 3 and stats["uptime_s"] >= 0
    schema = client.get("/openapi.json").json()
    assert {"/search", "/items", "/items/{item_id}", "/items/{item_id}/thumbnail"} <= set(
        schema["paths"]
    )
    assert "multipart/form-data" in schema["paths"]["/search"]["post"]["requestBody"]["content"]


def _slow(monkeypatch: pytest.MonkeyPatch, target: object, name: str, delay: float) -> list[int]:
    """Make ``target.name`` sleep ``delay`` s on its first call (a slow stage); the list
    counts calls that have finished."""
    import time

    original, done = getattr(target, name), []

    def slow(*args: object, **kwargs: object) -> object:
        if not done:
            time.sleep(delay)
        try:
            return original(*args, **kwargs)
        finally:
            done.append(1)

    monkeypatch.setattr(target, name, slow)
    return done


def test_a_slow_decode_stage_gets_504_in_about_the_timeout_and_frees_its_slot(
    bundle_copy: Path, gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline reaches the decode thread: the answer comes at the timeout, not when the
    slow stage ends; the late query never reaches the model; its decode slot comes back."""
    import time

    from retrieval.data.preprocessing import Preprocessing

    for client in make_client(bundle_copy, request_timeout_s=0.5, decode_slots=1):
        service = client.app.state.service  # type: ignore[attr-defined]
        embedded: list[int] = []
        model = service.batcher.embed_fn

        def counted(x: np.ndarray, model=model, embedded=embedded) -> np.ndarray:
            embedded.append(len(x))
            return model(x)

        service.batcher.embed_fn = counted
        done = _slow(monkeypatch, Preprocessing, "__call__", 1.5)
        start = time.monotonic()
        response = search(client, gallery.paths[0].read_bytes())
        took = time.monotonic() - start
        assert response.status_code == 504 and "0.5 s" in response.json()["detail"]
        assert took < 1.1, f"504 after {took:.2f} s, the timeout is 0.5 s"
        while not done and time.monotonic() - start < 5:
            time.sleep(0.05)
        time.sleep(0.1)
        assert embedded == []  # dropped before the model ran
        assert search(client, gallery.paths[1].read_bytes()).status_code == 200
        assert embedded == [1]
        decodes = client.get("/stats").json()["decodes"]
        assert decodes["small"]["running"] == 0 and decodes["large"]["running"] == 0


def test_a_slow_search_gets_504_in_about_the_timeout(
    bundle_copy: Path, gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    for client in make_client(bundle_copy, request_timeout_s=0.5):
        service = client.app.state.service  # type: ignore[attr-defined]
        _slow(monkeypatch, service.retriever, "search", 2.0)
        start = time.monotonic()
        response = search(client, gallery.paths[0].read_bytes())
        assert response.status_code == 504 and "0.5 s" in response.json()["detail"]
        assert time.monotonic() - start < 1.1
        time.sleep(1.6)
        assert search(client, gallery.paths[0].read_bytes()).status_code == 200


def test_large_decodes_beyond_the_queue_get_503_with_retry_after(
    bundle_copy: Path, gallery: Gallery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One large-decode slot and no queue: while it is busy, another large image is refused
    at once with 503 + Retry-After, and a small image still goes through its own lane."""
    import threading
    import time

    from retrieval.data.preprocessing import Preprocessing

    big = png_bytes(Image.new("RGB", (2100, 2100), (90, 140, 200)))  # 4.4 M pixels
    for client in make_client(bundle_copy, decode_slots=1, decode_queue=0):
        _slow(monkeypatch, Preprocessing, "prepare", 1.0)
        first: list[int] = []

        def send_first(client: TestClient = client, first: list[int] = first) -> None:
            first.append(search(client, big).status_code)

        worker = threading.Thread(target=send_first)
        worker.start()
        stats = client.app.state.service.large  # type: ignore[attr-defined]
        while stats.busy == 0 and worker.is_alive():
            time.sleep(0.01)
        refused = search(client, big + b"\x00")  # not the cached upload
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and "busy" in refused.json()["detail"]
        assert search(client, gallery.paths[2].read_bytes()).status_code == 200
        worker.join()
        assert first == [200]
        assert client.get("/stats").json()["decodes"]["large"]["refused"] == 1


def test_orphan_uploads_are_moved_aside_at_start(
    bundle_copy: Path, gallery: Gallery, tmp_path: Path
) -> None:
    """What a killed add leaves (a stored file with no item, a temp file of a write cut
    short) is cleared when the service starts; files items use stay."""
    from tests.bundle_fixtures import new_images

    new = new_images(tmp_path / "src", 2, seed=5)
    uploads = bundle_copy / "uploads"
    for client in make_client(bundle_copy, token=TOKEN):
        reply = client.post(
            "/items", files={"images": ("a.jpg", new[0].read_bytes())}, headers=AUTH
        )
        assert reply.status_code == 201, reply.text
        removed = reply.json()["added"][0]["id"]
        reply = client.post(
            "/items", files={"images": ("b.jpg", new[1].read_bytes())}, headers=AUTH
        )
        kept = reply.json()["added"][0]["id"]
        assert client.delete(f"/items/{removed}", headers=AUTH).status_code == 200
    (used,) = uploads.iterdir()
    orphan = uploads / (hashlib.sha256(b"never committed").hexdigest() + ".jpg")
    orphan.write_bytes(gallery.paths[0].read_bytes())
    temp = uploads / f".{orphan.name}.x1y2z3.tmp"
    temp.write_bytes(b"half written")
    other = uploads / "notes.txt"  # not a name the service writes: never touched
    other.write_text("keep")
    for client in make_client(bundle_copy, token=TOKEN):
        assert sorted(p.name for p in uploads.iterdir()) == sorted(
            [".orphans", used.name, "notes.txt"]
        )
        assert (uploads / ".orphans" / orphan.name).read_bytes() == gallery.paths[0].read_bytes()
        assert client.app.state.service.swept == [orphan]  # type: ignore[attr-defined]
        assert first_id(client, new[1].read_bytes()) == kept
        assert client.get(f"/items/{kept}/thumbnail").status_code == 200


def test_uploads_are_written_under_a_temp_name_then_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write cut short (here: the disk fails mid-write) leaves nothing under the final
    name, and what it leaves on a kill is a temp name the start-up sweep recognises."""
    import os

    from retrieval.service.item_images import _TEMP_NAME, UploadFolder

    folder = UploadFolder(tmp_path / "up")
    seen: list[str] = []
    real_replace = os.replace

    def crash(src: str, dst: str) -> None:
        seen.append(Path(src).name)
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        folder.store(b"\xff\xd8\xffdata", ".jpg")
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(folder.root.iterdir()) == [] and _TEMP_NAME.fullmatch(seen[0])


def test_odd_requests_are_4xx_json(client: TestClient) -> None:
    cases = {
        "image as a text field": client.post("/search", data={"image": "not a file"}),
        "wrong method": client.put("/search"),
        "unknown route": client.get("/nowhere"),
        "form with the wrong field": client.post(
            "/search", files={"picture": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")}
        ),
        "broken multipart": client.post(
            "/search",
            content=b"--b\r\nContent-Disposition: form-data; name=image\r\n\r\nxx",
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        ),
        "label too long": client.post(
            "/search",
            files={"image": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")},
            params={"label": "x" * 300},
        ),
    }
    for name, response in cases.items():
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert response.json()["detail"], name

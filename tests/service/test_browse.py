"""What the page builds on: an item's full image by id, its similar items without itself, pages
of one ranking past the first (``offset``), file names in results and the page's icon."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.postprocess import Rerank
from tests.bundle_fixtures import Gallery
from tests.service.conftest import AUTH, make_client
from tests.service.test_api import first_id, search


def test_full_image_is_the_items_own_file(client: TestClient, gallery: Gallery) -> None:
    item_id = first_id(client, gallery.paths[4].read_bytes())
    response = client.get(f"/items/{item_id}/image")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == gallery.paths[4].read_bytes()
    hit = search(client, gallery.paths[4].read_bytes(), k=1).json()["results"][0]
    assert hit["image"] == f"/items/{item_id}/image" and hit["name"] == gallery.paths[4].name
    assert client.get(f"/items/{item_id}").json()["image"] == f"/items/{item_id}/image"


def test_full_image_of_unknown_ids_and_missing_files_is_a_clear_404(
    client: TestClient, gallery: Gallery
) -> None:
    response = client.get("/items/999999/image")
    assert response.status_code == 404 and response.json()["detail"] == "no item with id 999999"
    for path in ["/items/-1/image", "/items/..%2F..%2Fetc%2Fpasswd/image", "/items/abc/image"]:
        assert 400 <= client.get(path).status_code < 500, path
    item_id = first_id(client, gallery.paths[12].read_bytes())
    moved = gallery.paths[12].with_suffix(".moved")
    gallery.paths[12].rename(moved)
    try:
        response = client.get(f"/items/{item_id}/image")
    finally:
        moved.rename(gallery.paths[12])
    assert response.status_code == 404 and "not available" in response.json()["detail"]
    assert str(gallery.root) not in response.text


def test_full_image_over_the_pixel_limit_is_refused(bundle_copy: Path, gallery: Gallery) -> None:
    for small in make_client(bundle_copy, max_pixels=96 * 96 - 1):  # the gallery is 96 x 96
        retriever = small.app.state.service.retriever  # type: ignore[attr-defined]
        item_id = retriever.search(gallery.vectors[:1], k=1)[0][0].id
        response = small.get(f"/items/{item_id}/image")
        assert response.status_code == 413, response.text
        assert "9,215 pixels" in response.json()["detail"]


def test_a_tiff_item_is_sent_as_a_jpeg_of_the_same_picture(
    client: TestClient, gallery: Gallery
) -> None:
    picture = Image.open(gallery.paths[6]).convert("RGB").rotate(90)
    buffer = io.BytesIO()
    picture.save(buffer, format="TIFF")
    added = client.post(
        "/items", files=[("images", ("new.tif", buffer.getvalue(), "image/tiff"))], headers=AUTH
    )
    assert added.status_code == 201, added.text
    response = client.get(f"/items/{added.json()['added'][0]['id']}/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    sent = Image.open(io.BytesIO(response.content))
    assert sent.format == "JPEG" and sent.size == picture.size
    diff = np.abs(np.asarray(sent, float) - np.asarray(picture, float)).mean()
    assert diff < 6, diff


def test_similar_can_leave_the_item_itself_out(client: TestClient, gallery: Gallery) -> None:
    item_id = first_id(client, gallery.paths[9].read_bytes())
    with_self = client.get(f"/items/{item_id}/similar", params={"k": 6}).json()["results"]
    assert with_self[0]["id"] == item_id
    without = client.get(
        f"/items/{item_id}/similar", params={"k": 5, "exclude_self": "true"}
    ).json()["results"]
    assert [h["id"] for h in without] == [h["id"] for h in with_self[1:]]
    label = gallery.labels[9]  # the label's other three images, with a label filter too
    same = client.get(
        f"/items/{item_id}/similar", params={"k": 10, "label": label, "exclude_self": "true"}
    ).json()["results"]
    assert len(same) == 3 and item_id not in {h["id"] for h in same}


def test_pages_of_one_ranking_join_up_to_the_whole_ranking(
    client: TestClient, gallery: Gallery
) -> None:
    data = gallery.paths[17].read_bytes()
    whole = search(client, data, k=40).json()
    assert len(whole["results"]) == 40 and whole["next_offset"] is None
    ids, offset = [], 0
    while offset is not None:
        page = search(client, data, k=7, offset=offset).json()
        assert page["offset"] == offset and len(page["results"]) == min(7, 40 - offset)
        ids += [h["id"] for h in page["results"]]
        offset = page["next_offset"]
    assert ids == [h["id"] for h in whole["results"]]
    item_id = whole["results"][0]["id"]
    similar = [
        client.get(
            f"/items/{item_id}/similar", params={"k": 13, "offset": o, "exclude_self": "true"}
        ).json()
        for o in (0, 13, 26)
    ]
    assert [p["next_offset"] for p in similar] == [13, 26, None]  # 39 items besides itself
    assert [h["id"] for p in similar for h in p["results"]] == ids[1:]


@pytest.mark.parametrize("top_n", [10, 30])
def test_pages_of_a_reranked_ranking_join_up_to_the_whole_ranking(
    bundle_copy: Path, gallery: Gallery, top_n: int
) -> None:
    """Re-ranking re-orders one pool whatever the page asks for: pages neither repeat nor skip
    ids of the whole re-ranked ranking."""
    for client in make_client(bundle_copy, max_k=40):
        retriever = client.app.state.service.retriever  # type: ignore[attr-defined]
        retriever.steps = replace(retriever.steps, rerank=Rerank(top_n=top_n, k1=4, k2=2))
        data = gallery.paths[9].read_bytes()
        whole = [h["id"] for h in search(client, data, k=40, rerank="true").json()["results"]]
        assert len(whole) == 40
        for k in (7, 10):
            ids = []
            for offset in range(0, 40, k):
                page = search(client, data, k=min(k, 40 - offset), offset=offset, rerank="true")
                ids += [h["id"] for h in page.json()["results"]]
            assert ids == whole, (k, top_n)


def test_paging_is_bounded_by_max_k(bundle_copy: Path, gallery: Gallery) -> None:
    for small in make_client(bundle_copy, max_k=10):
        data = gallery.paths[1].read_bytes()
        page = search(small, data, k=5, offset=5).json()
        assert len(page["results"]) == 5 and page["next_offset"] is None  # 40 items, max_k 10
        over = search(small, data, k=5, offset=6)
        assert over.status_code == 422 and "k=4 or fewer" in over.json()["detail"]
        assert search(small, data, k=1, offset=10).status_code == 422
        assert small.get("/items/1/similar", params={"k": 10, "offset": 1}).status_code == 422


@pytest.mark.parametrize("path", ["/favicon.ico"])
def test_the_page_has_an_icon_that_is_no_404_in_stats(client: TestClient, path: str) -> None:
    page = client.get("/").text
    assert '<link rel="icon" href="/favicon.ico"' in page
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"] == "image/svg+xml"
    assert response.content.startswith(b"<svg")
    routes = client.get("/stats").json()["routes"]
    assert routes[path]["by_status"] == {"200": 1}
    assert not [r for r, entry in routes.items() if "404" in entry["by_status"]]

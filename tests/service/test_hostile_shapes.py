"""Hostile image shapes against the service: an aspect ratio over the limit is refused with a
422 that names it (never a 500 or a decode that exhausts memory), and an item whose side is
over JPEG's 65,500 pixels is served as a PNG."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.service.item_images import Thumbnails
from tests.bundle.test_decode_bounds import thin_png
from tests.service.conftest import AUTH, TOKEN, make_client
from tests.service.test_api import search


@pytest.fixture
def roomy(bundle_copy: Path) -> Iterator[TestClient]:
    """Writes enabled, and a pixel limit that the long images below are within."""
    yield from make_client(bundle_copy, token=TOKEN, max_pixels=50_000_000)


def long_picture(width: int, height: int) -> Image.Image:
    """An RGB picture of ramps along both sides, so a wrong crop or flip shows."""
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    pixels = np.stack(np.broadcast_arrays(x + 0 * y, 255 - y + 0 * x, (x + y) / 2), axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", compression="tiff_deflate")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "shape"),
    [("tall.png", (40, 1_000_000)), ("thin.png", (1, 4_000_000)), ("strip.tif", (20, 70_000))],
)
def test_search_refuses_an_extreme_aspect_ratio_naming_the_limit(
    roomy: TestClient, name: str, shape: tuple[int, int]
) -> None:
    data = thin_png(*shape) if name.endswith(".png") else tiff_bytes(long_picture(*shape))
    response = search(roomy, data, name=name)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert f"'{name}'" in detail and f"{shape[0]}x{shape[1]} pixels" in detail
    assert "over the limit of 1000:1" in detail


def test_adding_an_extreme_tiff_is_refused_naming_the_limit(roomy: TestClient) -> None:
    files = [("images", ("strip.tif", tiff_bytes(long_picture(20, 70_000)), "image/tiff"))]
    response = roomy.post("/items", files=files, headers=AUTH)
    assert response.status_code == 422, response.text
    (rejected,) = response.json()["rejected"]
    assert rejected["name"] == "strip.tif" and "over the limit of 1000:1" in rejected["reason"]


def test_a_tiff_item_longer_than_a_jpeg_can_be_is_served_as_a_png(roomy: TestClient) -> None:
    picture = long_picture(70, 70_000)  # 1000:1, the longest allowed; 70,000 > 65,500
    files = [("images", ("long.tif", tiff_bytes(picture), "image/tiff"))]
    added = roomy.post("/items", files=files, headers=AUTH)
    assert added.status_code == 201, added.text
    item_id = added.json()["added"][0]["id"]
    response = roomy.get(f"/items/{item_id}/image")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    sent = Image.open(io.BytesIO(response.content))
    assert sent.format == "PNG" and sent.size == (70, 70_000)
    np.testing.assert_array_equal(np.asarray(sent.convert("RGB")), np.asarray(picture))
    thumbnail = roomy.get(f"/items/{item_id}/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"


def test_any_tiff_over_jpegs_side_limit_is_converted_to_a_png(tmp_path: Path) -> None:
    """The item image route's conversion, for a shape an add refuses (an exported bundle may
    hold one): 20 x 70,000."""
    path = tmp_path / "strip.tif"
    path.write_bytes(tiff_bytes(long_picture(20, 70_000)))
    data, media_type = Thumbnails(tmp_path.joinpath, 256, 50_000_000).converted(path)
    assert media_type == "image/png" and Image.open(io.BytesIO(data)).size == (20, 70_000)
    path.write_bytes(tiff_bytes(long_picture(20, 65_500)))  # JPEG's longest side
    data, media_type = Thumbnails(tmp_path.joinpath, 256, 50_000_000).converted(path)
    assert media_type == "image/jpeg" and Image.open(io.BytesIO(data)).size == (20, 65_500)

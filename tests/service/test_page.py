"""The search page in headless Chromium against ``retrieval serve``: choose a photo, drop a
photo, click a result, see an error; the results grid is checked on a screenshot.

Chromium comes from the system (``.ci/run`` installs Debian's ``chromium``); without it the
test is skipped, unless RETRIEVAL_REQUIRE_BROWSER=1 (as in CI) makes that a failure.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.bundle_fixtures import Gallery
from tests.service.live import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DROP = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/jpeg" }));
  document.getElementById("drop-zone").dispatchEvent(
    new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
}"""

if CHROMIUM is None and os.environ.get("RETRIEVAL_REQUIRE_BROWSER") == "1":
    pytest.fail("RETRIEVAL_REQUIRE_BROWSER=1 but no chromium on PATH", pytrace=False)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs the system's chromium (apt chromium)"),
]


def pixels(png_or_jpeg: bytes, size: int = 48) -> np.ndarray:
    image = Image.open(io.BytesIO(png_or_jpeg)).convert("RGB")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=float)


def top_id(base: str, path: Path) -> int:
    files = {"image": (path.name, path.read_bytes(), "image/jpeg")}
    return int(httpx.post(f"{base}/search", files=files, timeout=60).json()["results"][0]["id"])


def test_search_page_end_to_end(bundle_copy: Path, gallery: Gallery, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    query, dropped = gallery.paths[13], gallery.paths[30]
    with serve(bundle_copy) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
        page.on(
            "request",
            lambda r: (
                None
                if r.url.startswith((base, "blob:", "data:"))
                else problems.append(f"request outside the server: {r.url}")
            ),
        )
        page.goto(f"{base}/")
        expect(page.locator("#about")).to_contain_text("40 images")

        # choose a photo: the grid shows k=20 results, the photo itself first
        page.set_input_files("#file-input", str(query))
        cards = page.locator(".result")
        expect(cards).to_have_count(20)
        expected = top_id(base, query)
        first = cards.first
        expect(first).to_have_attribute("data-id", str(expected))
        expect(first.locator(".score")).to_have_text("1.000")
        expect(first.locator(".label")).to_have_text(gallery.labels[13])
        expect(page.locator("#preview")).to_be_visible()
        expect(page.locator("#status")).to_contain_text("20 results")

        # the screenshot of the first result shows that item's picture, not another one
        page.wait_for_function(
            "[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth)"
        )
        shot = pixels(first.locator("img").screenshot())
        own = pixels(httpx.get(f"{base}/items/{expected}/thumbnail").content)
        other_id = top_id(base, gallery.paths[2])  # another label's image
        other = pixels(httpx.get(f"{base}/items/{other_id}/thumbnail").content)
        assert np.abs(shot - own).mean() < 12 < np.abs(shot - other).mean()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if os.environ.get("RETRIEVAL_PAGE_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", os.environ["RETRIEVAL_PAGE_SCREENSHOT"])

        # click a result: it becomes the query
        clicked = cards.nth(5).get_attribute("data-id")
        cards.nth(5).click()
        expect(cards.first).to_have_attribute("data-id", str(clicked))
        expect(cards.first.locator(".score")).to_have_text("1.000")

        # drop a photo on the drop zone
        page.evaluate(DROP, [base64.b64encode(dropped.read_bytes()).decode(), dropped.name])
        expect(cards.first).to_have_attribute("data-id", str(top_id(base, dropped)))

        # a file that is not an image: the server's reason is shown, the grid stays
        page.set_input_files(
            "#file-input",
            files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"}],
        )
        expect(page.locator("#message")).to_be_visible()
        expect(page.locator("#message")).to_contain_text("is not a JPEG, PNG")
        expect(cards).to_have_count(20)
        browser.close()
    assert not problems, problems

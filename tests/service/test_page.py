"""The search page in headless Chromium against ``retrieval serve``: choose a photo, drop a
photo, click a result (its similar items without itself), open a full image, ask for more
results, see an error that clears the old results; the results grid is checked on a
screenshot, and no request of the page gets a 404 (its icon included).

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
            "response",
            lambda r: problems.append(f"{r.status} for {r.url}") if r.status == 404 else None,
        )
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
        expect(first.locator(".name")).to_have_text(query.name)  # shown, not only a tooltip
        expect(first.locator(".name")).to_be_visible()
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

        # a result's full image: the item's own file, opened in a new tab
        with page.context.expect_page() as opened:
            first.locator("a.open").click()
        tab = opened.value
        tab.wait_for_load_state()
        assert tab.url == f"{base}/items/{expected}/image"
        assert tab.evaluate("document.images[0].naturalWidth") == 96
        tab.close()

        # click a result: its similar items, the item itself left out
        clicked = cards.nth(5).get_attribute("data-id")
        cards.nth(5).locator(".pick").click()
        expect(page.locator("#query-item")).to_contain_text("Similar to")
        expect(page.locator("#status")).to_contain_text("itself left out")
        expect(cards).to_have_count(20)
        expect(page.locator(f'.result[data-id="{clicked}"]')).to_have_count(0)
        similar = httpx.get(f"{base}/items/{clicked}/similar", params={"k": 21}).json()
        expect(cards.first).to_have_attribute("data-id", str(similar["results"][1]["id"]))
        page.wait_for_function(
            "[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth)"
        )
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)  # the README's picture
        if os.environ.get("RETRIEVAL_PAGE_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", os.environ["RETRIEVAL_PAGE_SCREENSHOT"])

        # more results: the next page of the same ranking, until the collection ends
        expect(page.locator("#more")).to_be_visible()
        page.click("#more")
        expect(cards).to_have_count(39)  # 40 items less the clicked one
        expect(page.locator("#more")).to_be_hidden()
        shown = [cards.nth(i).get_attribute("data-id") for i in range(39)]
        assert clicked not in shown and len(set(shown)) == 39

        # drop a photo on the drop zone
        page.evaluate(DROP, [base64.b64encode(dropped.read_bytes()).decode(), dropped.name])
        expect(cards.first).to_have_attribute("data-id", str(top_id(base, dropped)))

        # a file that is not an image: the server's reason is shown, the old results and the
        # preview are cleared
        page.set_input_files(
            "#file-input",
            files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"}],
        )
        expect(page.locator("#message")).to_be_visible()
        expect(page.locator("#message")).to_contain_text("is not a JPEG, PNG")
        expect(cards).to_have_count(0)
        expect(page.locator("#preview")).to_be_hidden()
        expect(page.locator("#more")).to_be_hidden()
        browser.close()
        stats = httpx.get(f"{base}/stats").json()["routes"]
        assert not [r for r, entry in stats.items() if "404" in entry["by_status"]], stats
    assert not problems, problems


def test_duplicates_page(gallery: Gallery, bundle_template: Path, tmp_path: Path) -> None:
    """``retrieval duplicates --html``: every group's thumbnails load, the keeper is marked
    and comes first, the largest saving first; a screenshot is kept for eyes."""
    from playwright.sync_api import sync_playwright

    from retrieval.cli import main
    from tests.bundle_fixtures import transformed_copy

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(gallery.paths[:12:3]):
        (folder / f"p{i}.jpg").write_bytes(path.read_bytes())
        (folder / f"p{i}-edit.jpg").write_bytes(transformed_copy(path))
    (folder / "p0-copy.jpg").write_bytes((folder / "p0.jpg").read_bytes())
    page_dir = tmp_path / "page"
    args = ["duplicates", str(folder), "--model", str(bundle_template), "--threshold", "0.9"]
    assert main([*args, "--no-cache", "--quiet", "--html", str(page_dir)]) == 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.goto((page_dir / "index.html").as_uri())
        sections = page.locator("section")
        assert sections.count() >= 3
        for i in range(sections.count()):
            figures = sections.nth(i).locator("figure")
            assert figures.count() >= 2
            assert "keep" in (figures.first.get_attribute("class") or "")
            assert figures.nth(1).locator(".badge").inner_text() in ("exact", "near")
        loaded = page.evaluate(
            "[...document.images].every((img) => img.complete && img.naturalWidth > 0)"
        )
        assert loaded and not problems
        page.screenshot(path=str(tmp_path / "duplicates.png"), full_page=True)
        browser.close()
    shot = Image.open(tmp_path / "duplicates.png")
    assert shot.width >= 1000 and shot.height > 400


def test_duplicates_view(bundle_copy: Path, tmp_path: Path) -> None:
    """ "Find duplicates" shows GET /duplicates' groups, the copy to keep first and marked,
    every thumbnail loaded; a search afterwards replaces them."""
    from playwright.sync_api import expect, sync_playwright

    from retrieval.bundle.format import update_manifest

    table = [{"threshold": 0.8, "precision": 0.99, "recall": 0.9, "pairs": 1}]
    update_manifest(bundle_copy, duplicates={"threshold": 0.8, "table": table})
    with serve(bundle_copy) as base, sync_playwright() as playwright:
        expected = httpx.get(f"{base}/duplicates", params={"limit": 20}, timeout=60).json()
        assert expected["total"] >= 1
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.goto(base)
        page.click("#duplicates")
        groups = page.locator("#groups .group")
        expect(groups).to_have_count(len(expected["groups"]))
        expect(page.locator("#status")).to_contain_text(f"{expected['total']} groups")
        for i, group in enumerate(expected["groups"]):
            cards = groups.nth(i).locator(".copy")
            expect(cards).to_have_count(len(group))
            assert cards.first.get_attribute("data-id") == str(group[0]["id"])
            assert "keep" in (cards.first.get_attribute("class") or "")
        page.wait_for_function(
            "[...document.querySelectorAll('#groups img')].every(i => i.complete && i.naturalWidth)"
        )
        page.screenshot(path=str(tmp_path / "duplicates-view.png"), full_page=True)
        assert not problems
        browser.close()


def test_the_api_page_works_offline(bundle_copy: Path) -> None:
    """``/docs`` loads its script and style from the service itself (the installed
    swagger-ui-bundle), never from a CDN: every src and href of the page is local, and each
    one answers."""
    import re

    from tests.service.conftest import make_client

    for client in make_client(bundle_copy):
        page = client.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        links = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assert links and all(link.startswith("/") and not link.startswith("//") for link in links)
        assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
        for link in links:
            asset = client.get(link)
            assert asset.status_code == 200 and len(asset.content) > 100, link
        assert client.get("/openapi.json").json()["info"]["title"] == "Image retrieval"

"""Duplicates through the service: ``GET /duplicates`` pages the groups the Retriever finds,
and ``POST /items`` names the items an upload nearly duplicates."""

from __future__ import annotations

from pathlib import Path

from retrieval.bundle.format import update_manifest
from retrieval.search import Retriever
from tests.bundle_fixtures import Gallery, transformed_copy
from tests.service.conftest import AUTH, TOKEN, make_client

THRESHOLD = 0.85


def _calibrate(bundle: Path) -> None:
    table = [{"threshold": THRESHOLD, "precision": 0.99, "recall": 0.9, "pairs": 10}]
    update_manifest(
        bundle,
        duplicates={
            "threshold": THRESHOLD,
            "precision": 0.99,
            "calibrated_on": "a test",
            "table": table,
        },
    )


def test_upload_names_its_near_duplicates_and_groups_page(
    bundle_copy: Path, gallery: Gallery
) -> None:
    _calibrate(bundle_copy)
    original = gallery.paths[5]
    for client in make_client(bundle_copy, token=TOKEN):
        files = [("images", ("copy.jpg", transformed_copy(original), "image/jpeg"))]
        body = client.post("/items", files=files, headers=AUTH).json()
        assert body["duplicate_threshold"] == THRESHOLD
        (added,) = body["added"]
        (near,) = body["near_duplicates"]
        assert near["id"] == added["id"] and near["name"] == "copy.jpg"
        assert 5 in [s["id"] for s in near["similar"]]  # the original is item 5
        assert all(s["score"] >= THRESHOLD for s in near["similar"])

        full = client.get("/duplicates", params={"limit": 100}).json()
        assert full["threshold"] == THRESHOLD and full["total"] == len(full["groups"]) >= 1
        assert full["next_offset"] is None
        together = [g for g in full["groups"] if {added["id"], 5} <= {m["id"] for m in g}]
        assert len(together) == 1
        for group in full["groups"]:
            assert group[0]["keep"] and all(m["score"] >= THRESHOLD for m in group[1:])
        pages = [
            client.get("/duplicates", params={"offset": i, "limit": 1}).json()
            for i in range(full["total"])
        ]
        assert [p["groups"][0] for p in pages] == full["groups"]
        assert pages[-1]["next_offset"] is None and pages[0]["next_offset"] == (
            1 if full["total"] > 1 else None
        )
        low = client.get("/duplicates", params={"threshold": 0.5, "limit": 100}).json()
        assert low["threshold"] == 0.5 and low["threshold_source"] == "given"
        assert client.get("/duplicates", params={"threshold": 1.5}).status_code == 422
        assert client.get("/duplicates", params={"keep": "biggest"}).status_code == 422
    with Retriever.load(bundle_copy, read_only=True) as retriever:
        report = retriever.duplicates()
        ids = [[report.ids[m.row] for m in g.members] for g in report.groups]
    assert ids == [[m["id"] for m in g] for g in full["groups"]]


def test_without_a_calibration_the_threshold_is_asked_for(bundle_copy: Path) -> None:
    for client in make_client(bundle_copy):
        response = client.get("/duplicates")
        assert response.status_code == 422 and "threshold" in response.json()["detail"]
        assert client.get("/duplicates", params={"threshold": 0.9}).status_code == 200

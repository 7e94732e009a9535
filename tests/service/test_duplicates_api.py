"""Duplicates through the service: ``GET /duplicates`` pages the groups the Retriever finds,
and ``POST /items`` names the items an upload nearly duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        names = {s["name"]: s["id"] for s in near["similar"]}
        assert original.name in names  # the photo the upload is a copy of
        assert all(s["score"] >= THRESHOLD for s in near["similar"])
        source = names[original.name]

        full = client.get("/duplicates", params={"limit": 100}).json()
        assert full["threshold"] == THRESHOLD and full["total"] == len(full["groups"]) >= 1
        assert full["next_offset"] is None
        together = [g for g in full["groups"] if {added["id"], source} <= {m["id"] for m in g}]
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
        assert low["threshold"] == 0.5 and low["threshold_source"] == "given, cosine similarity"
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


def test_normalised_scores_agree_between_upload_and_groups(
    bundle_copy: Path, gallery: Gallery
) -> None:
    table = [{"threshold": 0.05, "precision": 0.99, "recall": 0.9, "pairs": 10}]
    update_manifest(
        bundle_copy,
        duplicates={"threshold": 0.05, "table": table, "normalisation": {"k": 3, "floor": 0.3}},
    )
    original = gallery.paths[9]
    for client in make_client(bundle_copy, token=TOKEN):
        files = [("images", ("copy.jpg", transformed_copy(original), "image/jpeg"))]
        body = client.post("/items", files=files, headers=AUTH).json()
        (added,) = body["added"]
        (near,) = body["near_duplicates"]
        uploaded = {s["name"]: s["score"] for s in near["similar"]}
        assert original.name in uploaded
        groups = client.get("/duplicates", params={"limit": 100}).json()["groups"]
        (group,) = [g for g in groups if added["id"] in {m["id"] for m in g}]
        assert group[0]["name"] == original.name  # more pixels: the original is kept
        (copy,) = [m for m in group if m["id"] == added["id"]]
        assert copy["score"] == pytest.approx(uploaded[original.name], abs=1e-5)
        assert (
            "normalised"
            in client.get("/duplicates", params={"threshold": 0.1}).json()["threshold_source"]
        )

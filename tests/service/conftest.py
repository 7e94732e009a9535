"""A service over a private copy of the test bundle, driven by an in-process client."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.search import Retriever
from retrieval.service import ServiceSettings, create_app

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_client(bundle: Path, **settings: object) -> Iterator[TestClient]:
    retriever = Retriever.load(bundle)
    app = create_app(retriever, ServiceSettings(**settings))  # type: ignore[arg-type]
    try:
        with TestClient(app) as client:
            yield client
    finally:
        retriever.close()


@pytest.fixture
def client(bundle_copy: Path) -> Iterator[TestClient]:
    """Writes enabled with ``TOKEN``; small limits so tests can cross them cheaply."""
    yield from make_client(
        bundle_copy, token=TOKEN, max_body_bytes=2 * 1024 * 1024, max_pixels=4_000_000
    )


@pytest.fixture
def read_only_client(bundle_copy: Path) -> Iterator[TestClient]:
    yield from make_client(bundle_copy)

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
from tests.milvus_engines import ENGINES, engine_target

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


def make_client(
    bundle: Path, backend: str | None = None, **settings: object
) -> Iterator[TestClient]:
    retriever = Retriever.load(bundle, backend=backend)
    app = create_app(retriever, ServiceSettings(**settings))  # type: ignore[arg-type]
    try:
        with TestClient(app) as client:
            yield client
    finally:
        retriever.close()


@pytest.fixture(params=["bundle", *ENGINES])
def backend(request: pytest.FixtureRequest, bundle_copy: Path) -> str | None:
    """Where the service searches: the bundle itself, or a collection of Milvus Lite or of a
    Milvus server that the bundle was pushed to (skipped where the engine is missing, see
    :mod:`tests.milvus_engines`)."""
    if request.param == "bundle":
        return None
    spec = engine_target(request.param, request, bundle_copy.parent / "lite")
    from retrieval.backends import parse_backend
    from retrieval.backends.milvus import push_bundle

    push_bundle(bundle_copy, parse_backend(spec))
    return spec


@pytest.fixture
def client(bundle_copy: Path, backend: str | None) -> Iterator[TestClient]:
    """Writes enabled with ``TOKEN``; small limits so tests can cross them cheaply."""
    yield from make_client(
        bundle_copy, backend, token=TOKEN, max_body_bytes=2 * 1024 * 1024, max_pixels=4_000_000
    )


@pytest.fixture
def read_only_client(bundle_copy: Path, backend: str | None) -> Iterator[TestClient]:
    yield from make_client(bundle_copy, backend)

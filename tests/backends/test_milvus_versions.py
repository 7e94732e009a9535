"""Milvus versions and collection layouts: the server's version read when connecting, servers
older than 2.3 refused in one line, the text fields nullable only where the server has that
(2.5 on, Milvus Lite) and empty text for "none" elsewhere, a collection of either layout read
right by a backend that would make the other, and credentials a server refuses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from retrieval.backends import BackendError, parse_backend
from retrieval.bundle.item_table import ItemTable
from retrieval.bundle.records import ItemRecord

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus) is not installed")

from retrieval.backends.milvus import MilvusBackend, push_store  # noqa: E402
from retrieval.backends.milvus.collection import nullable_text  # noqa: E402
from retrieval.backends.milvus.engine import TOKEN_VARIABLE, server_version  # noqa: E402
from tests.milvus_engines import engine_target, fresh_collection  # noqa: E402

DIM = 8


class _Said:
    def __init__(self, text: str) -> None:
        self.text = text

    def get_server_version(self) -> str:
        return self.text


@pytest.mark.parametrize(
    ("text", "release", "lite", "nullable"),
    [
        ("v2.3.5-lite", (2, 3, 5), False, False),  # the milvus package's server
        ("v2.4.17", (2, 4, 17), False, False),
        ("v2.5.0", (2, 5, 0), False, True),
        ("2.6.3", (2, 6, 3), False, True),
        ("milvus_lite-3.2.2", None, True, True),
        ("a build of its own", None, False, False),  # unknown: the layout every server takes
    ],
)
def test_server_versions_and_what_they_allow(text, release, lite, nullable) -> None:
    version = server_version(_Said(text))
    assert (version.release, version.lite, version.nullable) == (release, lite, nullable)


def pretend(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Every client says its server is ``text``."""
    from pymilvus import MilvusClient

    monkeypatch.setattr(MilvusClient, "get_server_version", lambda self, **kw: text)


def test_a_server_older_than_2_3_is_refused_in_one_line(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = engine_target("milvus-lite", request, tmp_path / "lite")
    pretend(monkeypatch, "v2.2.16")
    with pytest.raises(BackendError) as info:
        MilvusBackend.connect(parse_backend(target), DIM, create=None)
    message = str(info.value)
    assert message.startswith("Milvus v2.2.16 at collection 'retrieval'") and "\n" not in message
    assert "older than 2.3.0" in message and "upgrade the server" in message


def _store(folder: Path) -> ItemTable:
    """Four items: two labelled with a hash, two without either."""
    store = ItemTable.create(folder / "items.sqlite", DIM)
    x = np.eye(DIM, dtype=np.float32)[:4]
    store.add(
        [
            ItemRecord("/a.jpg", "cat", {}, "a" * 64),
            ItemRecord("/b.jpg"),
            ItemRecord("/c.jpg", "cat", {}, "c" * 64),
            ItemRecord("/d.jpg"),
        ],
        x,
    )
    return store


@pytest.mark.parametrize(("made_by", "opened_by"), [("v2.4.9", None), (None, "v2.3.5")])
def test_a_collection_of_one_layout_is_read_right_by_a_backend_that_makes_the_other(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    made_by: str | None,
    opened_by: str | None,
) -> None:
    """Made on Milvus Lite as a 2.4 server makes it (empty text for none) and opened as Milvus
    Lite (which would make nullable fields), or made nullable and opened as a 2.3 server."""
    target = engine_target("milvus-lite", request, tmp_path / "lite")
    spec = parse_backend(target)
    with _store(tmp_path) as store:
        if made_by:
            pretend(monkeypatch, made_by)
        push_store(store, spec)
    monkeypatch.undo()
    if opened_by:
        pretend(monkeypatch, opened_by)
    with MilvusBackend.connect(spec, DIM) as backend:
        assert nullable_text(backend._client, spec.collection) is (made_by is None)
        items = backend.get([1, 2, 3, 4])
        assert [items[i].label for i in (1, 2, 3, 4)] == ["cat", None, "cat", None]
        assert [items[i].content_sha256 for i in (2, 4)] == [None, None]
        assert backend.find_by_sha256("c" * 64) == [3]
        scores, ids = backend.search(np.eye(DIM, dtype=np.float32)[:2], 4, label="cat")
        assert sorted(ids[0].tolist()) == [1, 3]
        added = backend.add([ItemRecord("/e.jpg")], np.eye(DIM, dtype=np.float32)[4:5]).added
        fresh = backend.get(added)[added[0]]
        assert (fresh.label, fresh.content_sha256) == (None, None)
        assert backend.verify() == []


def test_credentials_the_server_refuses_are_one_line_naming_the_variable(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.environ.get("RETRIEVAL_MILVUS_SERVER"):
        pytest.skip("a server given by RETRIEVAL_MILVUS_SERVER may take anyone")
    address = request.getfixturevalue("milvus_standalone")  # authorization on
    target = fresh_collection(address, "credentials")
    monkeypatch.setenv(TOKEN_VARIABLE, "root:not-the-password")
    with pytest.raises(BackendError) as info:
        MilvusBackend.connect(parse_backend(target), DIM, timeout_s=5)
    message = str(info.value)
    assert "answers but refused the connection" in message and TOKEN_VARIABLE in message
    assert "\n" not in message

"""The Milvus engines the backend is tested on: Milvus Lite in the test process, and a real
Milvus standalone server (the ``milvus`` package's 2.3, started once per test session on
loopback by the ``milvus_standalone`` fixture, with authorization on and the backend given
``root:Milvus`` through ``RETRIEVAL_MILVUS_TOKEN``; or the server
``RETRIEVAL_MILVUS_SERVER=HOST:PORT`` names, e.g. a newer one run elsewhere, with the token
the environment gives).

Where no server can start, the server's tests are skipped and the skip says why; with
``RETRIEVAL_REQUIRE_MILVUS_SERVER=1`` (as in CI) that is a failure instead.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENGINES = ["milvus-lite", "milvus-server"]
_names = itertools.count()


ROOT_TOKEN = "root:Milvus"  # the first user of a Milvus server with authorization on


@pytest.fixture(scope="session")
def milvus_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of a Milvus server for the whole session (see the module doc)."""
    given = os.environ.get("RETRIEVAL_MILVUS_SERVER")
    if given:
        yield given
        return
    from retrieval.backends.milvus.engine import TOKEN_VARIABLE
    from retrieval.backends.milvus.standalone import StandaloneError, StandaloneServer

    folder = tmp_path_factory.mktemp("milvus-standalone")
    server = StandaloneServer(folder, authorization=True)
    try:
        address = server.start()
    except StandaloneError as err:
        if os.environ.get("RETRIEVAL_REQUIRE_MILVUS_SERVER") == "1":
            pytest.fail(f"RETRIEVAL_REQUIRE_MILVUS_SERVER=1 but {err}", pytrace=False)
        pytest.skip(f"no Milvus server: {err}")
    before = os.environ.get(TOKEN_VARIABLE)
    os.environ[TOKEN_VARIABLE] = ROOT_TOKEN  # this process and the serve / push it starts
    try:
        yield address
    finally:
        server.stop()
        if before is None:
            os.environ.pop(TOKEN_VARIABLE, None)
        else:
            os.environ[TOKEN_VARIABLE] = before


def server_client(address: str) -> Any:
    """A pymilvus client of the server at ``address``, with the backend's credentials."""
    from pymilvus import MilvusClient

    from retrieval.backends.milvus.engine import TOKEN_VARIABLE

    token = os.environ.get(TOKEN_VARIABLE, "")
    return MilvusClient(uri=f"http://{address}", token=token, timeout=30)


def fresh_collection(address: str, name: str) -> str:
    """``milvus://ADDRESS/NAME``, with any collection of that name (and its removal record)
    left on the server by an earlier run dropped first."""
    client = server_client(address)
    try:
        for old in (name, f"{name}__removed"):
            if client.has_collection(old):
                client.drop_collection(old)
    finally:
        client.close()
    return f"milvus://{address}/{name}"


def collection_name(request: pytest.FixtureRequest) -> str:
    """A collection name of its own for each call in this session (letters, digits, _)."""
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    return f"t_{digest}_{next(_names)}"


def engine_target(engine: str, request: pytest.FixtureRequest, folder: Path) -> str:
    """A new, empty item collection on ``engine``: ``milvus-lite:FOLDER`` (Milvus Lite in this
    process) or a fresh collection on the session's server."""
    pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus) is not installed")
    if engine == "milvus-lite":
        pytest.importorskip("milvus_lite", reason="the milvus extra (milvus-lite) is not installed")
        return f"milvus-lite:{folder}"
    address = request.getfixturevalue("milvus_standalone")
    return fresh_collection(address, collection_name(request))

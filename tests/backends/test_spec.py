"""Backend specs and the README's backend commands, without pymilvus."""

from __future__ import annotations

import shlex

import pytest

from retrieval.backends import BackendError, parse_backend
from retrieval.cli import build_parser
from tests.documents import bash_lines


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("milvus://host-without-port/items", "milvus://HOST:PORT/COLLECTION"),
        ("milvus://127.0.0.1:19530/", "names no collection"),
        ("milvus://127.0.0.1:99999/items", "port 99999"),
        ("milvus://127.0.0.1:19530/bad-name", "collection name 'bad-name'"),
        ("milvus-lite:", "names no folder"),
        ("qdrant://x:1/y", "unknown backend"),
    ],
)
def test_malformed_specs_get_one_line_naming_the_part(text: str, words: str) -> None:
    with pytest.raises(BackendError) as err:
        parse_backend(text)
    assert words in str(err.value) and text in str(err.value) and "\n" not in str(err.value)


def test_well_formed_specs() -> None:
    spec = parse_backend("milvus://milvus.internal:19530/photos")
    assert (spec.kind, spec.uri, spec.collection) == (
        "milvus",
        "http://milvus.internal:19530",
        "photos",
    )
    assert parse_backend("milvus://[::1]:19530/p").uri == "http://[::1]:19530"
    lite = parse_backend("milvus-lite:rel/dir#shoes")
    assert lite.kind == "milvus-lite" and lite.collection == "shoes" and lite.path is not None
    assert lite.path.is_absolute() and lite.path.name == "dir"
    assert parse_backend("milvus-lite:/data/lite").collection == "retrieval"


def test_the_readme_backend_commands_parse() -> None:
    found = [
        line for line in bash_lines() if line.startswith(("retrieval push", "retrieval serve"))
    ]
    specs = []
    for line in found:
        args = build_parser().parse_args(shlex.split(line)[1:])
        spec = getattr(args, "target", None) or getattr(args, "backend", None)
        if spec:
            specs.append(parse_backend(spec).kind)
    assert specs.count("milvus") >= 2 and specs.count("milvus-lite") >= 2, found


def test_without_pymilvus_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """The base install has no pymilvus: importing the package works, naming a Milvus backend
    fails with one line that says which extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus -> ImportError
    from retrieval.backends import open_backend

    with pytest.raises(BackendError, match=r"needs pymilvus .*pip install -e '\.\[milvus\]'"):
        open_backend("milvus://127.0.0.1:19530/photos", 64)

"""A bundle altered with matching checksums (a checksum is no signature) is refused by
``Retriever.load`` and reported by ``retrieval verify``: preprocessing that does not fit the
model, an index factory that does not describe the index, search steps out of bounds, item
uris that leave the bundle's folder. ``verify`` reads beside a writer."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.bundle.format import BundleError, read_manifest, write_manifest
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.model_config import check_model_config
from retrieval.bundle.records import ItemRecord
from retrieval.bundle.snapshot import IndexStateError
from retrieval.cli import main
from retrieval.data.preprocessing import Preprocessing
from retrieval.postprocess import Postprocess
from retrieval.search import Retriever
from tests.data.test_preprocessing import GOOD as GOOD_PRE

GOOD_MODEL: dict[str, Any] = {
    "backbone": {"name": "resnet18"},
    "embedder": {"embedding_dim": 8, "pooling": "avg"},
    "input_size": 32,
    "output_dim": 8,
}


def resign(bundle: Path, **fields: Any) -> None:
    """Rewrite the manifest with ``fields`` changed and every checksum recomputed, as someone
    altering the bundle would."""
    manifest = read_manifest(bundle)
    files = list(manifest.pop("files"))
    body = {k: v for k, v in manifest.items() if k not in ("format", "format_version")}
    write_manifest(bundle, {**body, **fields}, files)


def edit_json(path: Path, **fields: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}), encoding="utf-8")


def verify(capsys: pytest.CaptureFixture[str], bundle: Path) -> tuple[int, str, str]:
    code = main(["verify", str(bundle)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys: pytest.CaptureFixture[str], bundle: Path, pattern: str) -> None:
    """Load refuses the bundle naming ``pattern``; verify reports it as a problem (exit 1)."""
    with pytest.raises(BundleError, match=pattern):
        Retriever.load(bundle, read_only=True)
    code, out, err = verify(capsys, bundle)
    assert (code, err) == (1, "")
    assert out.startswith("problem: ") and "bundle OK" not in out
    assert len(out.splitlines()[0]) < 600


# ---------------------------------------------------------------- preprocessing vs model


def test_a_huge_preprocessing_input_size_with_a_matching_checksum_is_refused(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_json(bundle_copy / "preprocessing.json", input_size=30000, resize=30000)
    resign(bundle_copy)
    assert_refused(capsys, bundle_copy, r"preprocessing\.json.*input_size")


def test_preprocessing_must_have_the_models_input_size(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_json(bundle_copy / "preprocessing.json", input_size=96, resize=110)  # in bounds
    resign(bundle_copy)
    assert_refused(capsys, bundle_copy, r"preprocessing\.json.*input_size 96.*model\.json.* 64")


def test_preprocessing_resize_mode_must_fit_the_model(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_json(bundle_copy / "preprocessing.json", resize_mode="short", resize=64)
    resign(bundle_copy)
    assert_refused(capsys, bundle_copy, r"preprocessing\.json.*resize_mode 'short'.*any_size")


def test_input_sizes_are_bounded_in_preprocessing_and_model_json() -> None:
    from retrieval.data.preprocessing import MAX_INPUT_SIZE

    Preprocessing.from_json(GOOD_PRE)
    check_model_config(GOOD_MODEL, complete=True)
    big = MAX_INPUT_SIZE + 1
    with pytest.raises(ValueError, match=rf"input_size.*{MAX_INPUT_SIZE}.*got {big}"):
        Preprocessing.from_json({**GOOD_PRE, "input_size": big, "resize": big})
    with pytest.raises(ValueError, match=r"resize.*64.*got 65"):  # at most twice input_size
        Preprocessing.from_json({**GOOD_PRE, "resize": 65})
    huge_vit = {**GOOD_MODEL["backbone"], "kwargs": {"img_size": 30000}}
    with pytest.raises(BundleError, match=rf"'img_size'.*{MAX_INPUT_SIZE}"):
        check_model_config({**GOOD_MODEL, "backbone": huge_vit}, complete=True)
    huge_tta = {**GOOD_MODEL["embedder"], "tta": {"scales": [1000.0], "flip": False}}
    with pytest.raises(BundleError, match=r"embedder\.tta"):
        check_model_config({**GOOD_MODEL, "embedder": huge_tta}, complete=True)


# ---------------------------------------------------------------- index factory


def test_a_manifest_factory_that_does_not_describe_the_index_is_refused(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resign(bundle_copy, index={"factory": "IVF1,Flat", "search_params": ""})
    assert_refused(capsys, bundle_copy, r"index\.factory 'IVF1,Flat'.*'Flat'")


def test_a_recorded_factory_that_does_not_build_the_index_file_is_refused(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with IndexedItems.create(tmp_path / "items", 8) as items:
        items.add([ItemRecord(f"{i}.jpg") for i in range(5)], x)
    conn = sqlite3.connect(tmp_path / "items" / "items.sqlite")
    with conn:
        conn.execute("UPDATE snapshots SET factory = 'IVF1,Flat'")
    conn.close()
    for read_only in (False, True):
        with pytest.raises(IndexStateError, match=r"index\.faiss.*'IVF1,Flat'"):
            IndexedItems.open(tmp_path / "items", read_only=read_only)


# ---------------------------------------------------------------- search steps


@pytest.mark.parametrize(
    ("steps", "named"),
    [
        ({"aqe": {"k": 10**12}}, "postprocess.aqe.k"),
        ({"dba": {"k": 5000}}, "postprocess.dba.k"),
        ({"aqe": {"alpha": 1e9}}, "postprocess.aqe.alpha"),
        ({"rerank": {"top_n": 10**9}}, "postprocess.rerank.top_n"),
        ({"rerank": {"k1": 10**6}}, "postprocess.rerank.k1"),
        ({"score_norm": {"k": 10**6}}, "postprocess.score_norm.k"),
        ({"score_norm": {"background": 10**12}}, "postprocess.score_norm.background"),
        ({"tta": {"scales": [1.0] * 100}}, "postprocess.tta.scales"),
    ],
)
def test_search_step_settings_are_bounded(steps: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        Postprocess.from_dict(steps)


def test_the_bounds_keep_the_shipped_settings() -> None:
    Postprocess.from_dict({"aqe": {"k": 10}, "dba": {"k": 10}, "rerank": {}, "score_norm": {}})


def test_a_manifest_with_out_of_bounds_steps_is_refused(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resign(bundle_copy, postprocess={"steps": {"aqe": {"k": 10**12}}})
    assert_refused(capsys, bundle_copy, r"manifest\.json.*postprocess\.aqe\.k")


# ---------------------------------------------------------------- item uris


def test_item_path_keeps_relative_uris_inside_the_folder(tmp_path: Path) -> None:
    from retrieval.bundle.items import item_path

    assert item_path(tmp_path, "a/b.jpg") == tmp_path / "a/b.jpg"
    assert item_path(tmp_path, "a/../b.jpg") == tmp_path / "a/../b.jpg"
    assert item_path(tmp_path, "/data/x.jpg") == Path("/data/x.jpg")
    for uri in ("../x.jpg", "a/../../x.jpg", "..", "./../x"):
        with pytest.raises(BundleError, match="outside"):
            item_path(tmp_path, uri)


def test_an_item_uri_that_leaves_the_bundle_is_refused_and_reported(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = sqlite3.connect(bundle_copy / "items.sqlite")
    with conn:
        conn.execute("UPDATE items SET uri = '../../../etc/passwd' WHERE id = 3")
        conn.execute("UPDATE items SET uri = 'thumbs/inside.jpg' WHERE id = 4")
    conn.close()
    assert_refused(capsys, bundle_copy, r"items\.sqlite.*outside.*\[3\]")
    with IndexedItems.open(bundle_copy) as items:  # the way out the message gives
        items.remove([3])
    with Retriever.load(bundle_copy, read_only=True) as loaded:
        assert loaded.verify() == []


# ---------------------------------------------------------------- verify beside a writer


def test_verify_runs_while_a_writer_holds_the_bundle(
    bundle_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Retriever.load(bundle_copy):  # the writer, as retrieval serve holds it
        assert verify(capsys, bundle_copy) == (0, "bundle OK\n", "")

"""The ``retrieval`` command on a real bundle: search, index, info, verify, help and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from retrieval.cli import main
from retrieval.search import Retriever
from tests.bundle_fixtures import Gallery, negate_stored_vector, new_images

SUBCOMMANDS = ["search", "index", "info", "verify"]


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``retrieval ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def shared_bundle(bundle_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy for the commands that only read (each one opens and closes it)."""
    return Path(shutil.copytree(bundle_template, tmp_path_factory.mktemp("cli") / "bundle"))


# ---------------------------------------------------------------- search


def test_search_prints_a_table_with_the_image_itself_first(
    capsys: pytest.CaptureFixture[str], shared_bundle: Path, gallery: Gallery
) -> None:
    query = gallery.paths[6]
    code, out, err = run(capsys, "search", shared_bundle, query, "-k", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(query)
    assert lines[1].split() == ["rank", "score", "id", "label", "path"]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 3
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert rows[0][1] == "1.000" and rows[0][3] == gallery.labels[6]
    assert rows[0][4] == str(query)


def test_search_json_is_parseable_and_sorted(
    capsys: pytest.CaptureFixture[str], shared_bundle: Path, gallery: Gallery
) -> None:
    queries = gallery.paths[:2]
    code, out, err = run(capsys, "search", shared_bundle, *queries, "-k", "5", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert [entry["query"] for entry in payload] == [str(q) for q in queries]
    for query, entry in zip(queries, payload, strict=True):
        results = entry["results"]
        assert len(results) == 5
        assert set(results[0]) == {"id", "score", "uri", "label", "extra"}
        assert results[0]["uri"] == str(query)
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True)


def test_search_with_a_label_keeps_only_that_label(
    capsys: pytest.CaptureFixture[str], shared_bundle: Path, gallery: Gallery
) -> None:
    label = gallery.labels[-1]
    argv = ["search", shared_bundle, gallery.paths[0], "--label", label, "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    (entry,) = json.loads(out)
    assert len(entry["results"]) == 4
    assert {r["label"] for r in entry["results"]} == {label}


def test_search_errors_exit_2_with_the_reason(
    capsys: pytest.CaptureFixture[str], shared_bundle: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.jpg"
    code, out, err = run(capsys, "search", shared_bundle, missing)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(missing) in err
    code, _, err = run(capsys, "search", shared_bundle, missing, "-k", "0")
    assert code == 2 and "k must be a positive integer" in err
    code, _, err = run(capsys, "search", tmp_path, missing)
    assert code == 2 and f"{tmp_path} is not a bundle" in err


def test_search_skips_and_reports_an_unreadable_query_image(
    capsys: pytest.CaptureFixture[str], shared_bundle: Path, gallery: Gallery, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = gallery.paths[3]
    code, out, err = run(capsys, "search", shared_bundle, good, broken, "-k", "2")
    assert code == 0
    assert out.splitlines()[0] == str(good) and str(broken) not in out
    assert f"skipped {broken}: " in err
    assert "searched 1 of 2 images, 1 unreadable" in err and "Traceback" not in err
    code, out, err = run(capsys, "search", shared_bundle, broken, good, "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload[0]["query"] == str(good) and payload[0]["results"][0]["uri"] == str(good)
    assert payload[1]["query"] == str(broken) and payload[1]["error"]
    code, out, err = run(capsys, "search", shared_bundle, broken, broken)
    assert code == 2 and out == ""
    assert err.startswith("error: none of the 2 query images could be read")
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------- beside a writer


def test_search_info_and_score_run_while_the_bundle_is_held_for_writing(
    capsys: pytest.CaptureFixture[str], bundle_copy: Path, tmp_path: Path
) -> None:
    """``retrieval serve`` (or ``index``) holds the bundle for writing; searches read beside
    it and see what it committed, including items added after its last index snapshot."""
    fresh = new_images(tmp_path / "new", 1)
    with Retriever.load(bundle_copy) as writer:  # as retrieval serve does
        report = writer.add(fresh)
        code, out, err = run(capsys, "search", bundle_copy, fresh[0], "-k", "1", "--json")
        assert code == 0, err
        (entry,) = json.loads(out)
        assert entry["results"][0]["id"] == report.added[0]
        code, out, err = run(capsys, "info", bundle_copy, "--json")
        assert code == 0 and json.loads(out)["items"] == 41, err
        code, out, err = run(capsys, "index", bundle_copy, tmp_path / "new", "--quiet")
        assert code == 2 and out == ""
        assert err.startswith("error: ") and "already open for writing" in err
        assert len(err.splitlines()) == 1
        writer.remove(report.added)
        code, out, err = run(capsys, "search", bundle_copy, fresh[0], "-k", "1", "--json")
        assert code == 0 and json.loads(out)[0]["results"][0]["id"] != report.added[0]


# ---------------------------------------------------------------- index


def test_index_adds_a_folder_and_counts_what_it_did(
    capsys: pytest.CaptureFixture[str], bundle_copy: Path, gallery: Gallery, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    fresh = new_images(folder / "cats", 2) + new_images(folder, 1, seed=8)
    shutil.copyfile(gallery.paths[0], folder / "twin.jpg")  # content already in the bundle
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image, not listed")
    argv = ["index", bundle_copy, folder, "--labels", "folder", "--quiet"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out.strip() == ("added 3, already present 1, unreadable 1; the bundle holds 43 items")
    assert f"skipped {folder / 'broken.png'}" in err
    with Retriever.load(bundle_copy) as loaded:
        results = loaded.search(fresh, k=1)
    assert [hits[0].uri for hits in results] == [str(p.resolve()) for p in fresh]
    assert [hits[0].label for hits in results] == ["cats", "cats", None]
    code, out, err = run(capsys, *argv)  # a second run adds nothing
    assert code == 0, err
    assert out.strip() == ("added 0, already present 4, unreadable 1; the bundle holds 43 items")


def test_index_refuses_a_folder_without_images(
    capsys: pytest.CaptureFixture[str], bundle_copy: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    code, out, err = run(capsys, "index", bundle_copy, empty, "--quiet")
    assert code == 2 and out == ""
    assert "holds no images" in err and str(empty) in err
    code, _, err = run(capsys, "index", bundle_copy, tmp_path / "nowhere", "--quiet")
    assert code == 2 and "is not a folder" in err
    code, out, err = run(capsys, "info", bundle_copy, "--json")
    assert code == 0 and json.loads(out)["items"] == 40


# ---------------------------------------------------------------- info and verify


def test_info_prints_the_summary(capsys: pytest.CaptureFixture[str], shared_bundle: Path) -> None:
    code, out, err = run(capsys, "info", shared_bundle)
    assert code == 0, err
    lines = out.splitlines()
    fields = {line[:16].strip(): line[16:] for line in lines if not line.startswith(" ")}
    assert fields["items"] == "40"
    assert fields["embedding"] == "1280-d, inner_product"
    assert fields["backbone"] == "tf_efficientnet_lite0"
    assert fields["runtime"] == "onnx"
    assert fields["index"] == "Flat" and fields["search params"] == "none"
    assert fields["search steps"] == "none"
    assert "{" not in out  # no raw dicts
    metrics = [line.split() for line in lines if line.startswith("  ")]
    assert ["test/recall@1", "0.8750"] in metrics


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_info_json(capsys: pytest.CaptureFixture[str], shared_bundle: Path, runtime: str) -> None:
    code, out, err = run(capsys, "info", shared_bundle, "--json", "--runtime", runtime)
    assert code == 0, err
    info = json.loads(out)
    assert info["items"] == 40 and info["embedding_dim"] == 1280
    assert info["runtime"] == runtime
    assert info["bundle"] == str(shared_bundle)
    assert info["metrics"] == {"test/recall@1": 0.875, "test/map@r": 0.5}


def test_verify_exits_0_when_healthy_and_1_on_a_problem(
    capsys: pytest.CaptureFixture[str], bundle_copy: Path
) -> None:
    code, out, err = run(capsys, "verify", bundle_copy)
    assert (code, out, err) == (0, "bundle OK\n", "")
    negate_stored_vector(bundle_copy, 2)  # loads fine; only the full check sees it
    code, out, _ = run(capsys, "verify", bundle_copy)
    assert code == 1
    assert out.splitlines() == [
        "problem: item 2 is not among the nearest of its own vector",
        "1 problem(s) found",
    ]


def test_verify_of_an_altered_file_is_a_problem_found_exit_1(
    capsys: pytest.CaptureFixture[str], bundle_copy: Path, tmp_path: Path
) -> None:
    (bundle_copy / "model.onnx").write_bytes(b"truncated")
    code, out, err = run(capsys, "verify", bundle_copy)
    assert code == 1 and err == ""
    assert out.startswith("problem: ") and "model.onnx does not match its checksum" in out
    code, out, err = run(capsys, "verify", tmp_path)  # not a bundle at all: an error
    assert code == 2 and out == "" and err.startswith("error: ")


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: retrieval {command} ")
    assert "bundle" in out and "--runtime" in out


def test_version_and_exit_codes_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"retrieval {version('retrieval')}"
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1 problems found (verify); 2 an error" in out


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["nonsense"], ["search", "bundle"], ["info", "b", "--runtime", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "usage: retrieval" in capsys.readouterr().err


def test_the_installed_console_script_runs() -> None:
    script = shutil.which("retrieval")
    if script is None:
        pytest.skip("the retrieval console script is not installed")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: retrieval ")
    for command in SUBCOMMANDS:
        assert command in done.stdout

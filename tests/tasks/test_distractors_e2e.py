"""``python evaluate.py data=roxford5k data.root=... +distractors=r1m distractors.root=...`` end
to end on fake trees in the published layouts: the distractors embedded into shards (resumed on
a second run), scored as if appended to the gallery, the E/M/H table printed under
"revisited+R1M"; bad distractor input is one line naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.listed import evaluate_revisited
from retrieval.evaluation.npz import read_embeddings_npz
from retrieval.index.shards import ShardSet
from retrieval.tasks.evaluate import evaluate
from retrieval.tasks.preflight import problem_with
from retrieval.tasks.runs import reported
from tests.datasets.test_benchmark_converters import _noise_jpeg, gldv2_tree, revisited_tree
from tests.tasks.test_benchmarks_e2e import _compose, assert_prints_the_emh_table

R1M_NAMES = [f"{i % 3}/{i:04d}" for i in range(7)]  # list lines, no extension, as released


def r1m_tree(root: Path, names: list[str] = R1M_NAMES) -> Path:
    """``root/jpg/<name>.jpg`` noise images and ``root/revisitop1m.txt`` listing them."""
    for i, name in enumerate(names):
        _noise_jpeg(root / "jpg" / f"{name}.jpg", (36 + i, 28 + 3 * i), seed=100 + i)
    (root / "revisitop1m.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return root


def _overrides(root: Path, r1m: Path, *more: str) -> list[str]:
    return [
        "data=roxford5k",
        f"data.root={root}",
        "+distractors=r1m",
        f"distractors.root={r1m}",
        "distractors.shard_size=3",
        f"distractors.shards_dir={r1m.parent}/shards",
        *more,
    ]


def test_r1m_end_to_end_scores_the_gallery_with_the_distractors_appended(tmp_path, capsys):
    root = revisited_tree(tmp_path / "roxford5k", gallery=12)
    r1m = r1m_tree(tmp_path / "revisitop1m")
    metrics, _ = evaluate(_compose(tmp_path, *_overrides(root, r1m)))
    printed = capsys.readouterr().out
    assert_prints_the_emh_table(printed)
    assert "(revisited+R1M)" in printed
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["protocol"]["data"]["protocol"] == "revisited+R1M"
    described = report["protocol"]["distractors"]
    assert described["images"] == 7 and described["embedded"] == 7
    assert report["protocol"]["evaluation"]["index"]["distractors"] == 7
    (folder,) = described["shards"]
    shards = ShardSet.open(folder)
    assert shards.counts == [3, 3, 1]
    assert [Path(i.uri) for i in shards.items(2)] == [r1m / "jpg" / "0/0006.jpg"]
    # the scores are those of the distractors appended to the gallery in one piece
    saved = read_embeddings_npz(tmp_path / "out" / "embeddings.npz")
    assert saved.gallery is not None and saved.gallery.shape[0] == 12
    xb = np.concatenate([saved.gallery, *shards.shard_vectors()])
    lists = [[0, 2], []], [[1], [4]], [[3], [5, 0]]  # revisited_tree's easy, hard and junk
    expected = evaluate_revisited(saved.query, xb, *lists, kappas=(1, 5, 10))
    for name, value in expected.metrics.items():
        assert metrics[f"test/{name}"] == pytest.approx(value, abs=1e-9), name
    # a second run (another run folder) reads the finished shards back, embedding none again
    written = {p: p.stat().st_mtime_ns for p in Path(folder).glob("shard-*")}
    again, _ = evaluate(_compose(tmp_path / "second", *_overrides(root, r1m)))
    second = json.loads((tmp_path / "second" / "out" / "metrics.json").read_text())
    assert second["protocol"]["distractors"]["shards"] == [folder]
    assert {p: p.stat().st_mtime_ns for p in Path(folder).glob("shard-*")} == written
    assert again["test/map_medium"] == pytest.approx(metrics["test/map_medium"], abs=1e-9)


def test_the_command_line_composes_and_names_a_missing_root() -> None:
    base = ["data=roxford5k", "data.root=/data/roxford5k", "+distractors=r1m"]
    assert problem_with("evaluate", [*base, "distractors.root=/data/revisitop1m"]) is None
    problem = problem_with("evaluate", base)
    assert problem is not None and "distractors.root is required" in problem


def _one_line_error(tmp_path: Path, capsys, overrides: list[str]) -> str:
    """The ``error:`` line ``python evaluate.py OVERRIDES`` ends with (exit status 2); lines
    of embedding progress may come before it."""
    with pytest.raises(SystemExit) as info:  # as python evaluate.py reports it
        reported(evaluate)(_compose(tmp_path, *overrides))
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_a_missing_list_file_is_one_line(tmp_path: Path, capsys) -> None:
    root = revisited_tree(tmp_path / "roxford5k")
    r1m = r1m_tree(tmp_path / "revisitop1m")
    (r1m / "revisitop1m.txt").unlink()
    error = _one_line_error(tmp_path, capsys, _overrides(root, r1m))
    assert f"{r1m / 'revisitop1m.txt'} is missing" in error and "list_file=null" in error


def test_an_unreadable_distractor_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    root = revisited_tree(tmp_path / "roxford5k")
    r1m = r1m_tree(tmp_path / "revisitop1m")
    broken = r1m / "jpg" / "1/0004.jpg"
    broken.write_bytes(b"no image here")
    error = _one_line_error(tmp_path, capsys, _overrides(root, r1m))
    assert str(broken) in error and "extract it again" in error


def test_distractors_are_refused_with_dba_and_for_other_benchmarks(tmp_path, capsys) -> None:
    root = revisited_tree(tmp_path / "roxford5k")
    r1m = r1m_tree(tmp_path / "revisitop1m")
    error = _one_line_error(tmp_path, capsys, _overrides(root, r1m, "postprocess=[dba]"))
    assert "dba and aqe are not supported with distractors" in error
    gldv2 = gldv2_tree(tmp_path / "gldv2")
    overrides = _overrides(root, r1m, "data=gldv2", f"data.root={gldv2}")[2:]
    error = _one_line_error(tmp_path, capsys, overrides)
    assert "adds distractors to the revisited benchmarks" in error and "data=roxford5k" in error

"""``evaluate`` end to end on tiny fake trees in the published layouts of Revisited Oxford /
Paris and GLDv2: convert, crop, embed with a tiny untrained model, score, print the table."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.listed import evaluate_relevant_lists, revisited_rankings
from retrieval.evaluation.npz import read_embeddings_npz
from retrieval.tasks.evaluate import evaluate
from retrieval.tasks.runs import reported
from tests.datasets.test_benchmark_converters import gldv2_tree, revisited_tree, sfm120k_tree
from tests.tasks.test_evaluate_task import compose_eval

TINY = [
    "backbone=resnet18",
    "backbone.pretrained=false",
    "data.image_size=64",
    "data.num_workers=0",
    "logger=csv",
    "save_embeddings=true",
]


def _compose(tmp_path: Path, *overrides: str):
    return compose_eval(tmp_path, *TINY, *overrides)


def assert_prints_the_emh_table(printed: str) -> None:
    """The E/M/H table: its header, then one row per setup in the papers' order."""
    header = next(line for line in printed.splitlines() if line.startswith("setup"))
    assert header.split() == ["setup", "mAP", "mP@1", "mP@5", "mP@10"]
    rows = [line.split()[0] for line in printed.splitlines() if line[:2] in ("E ", "M ", "H ")]
    assert rows == ["E", "M", "H"]


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited_benchmark_end_to_end(tmp_path: Path, capsys, name: str) -> None:
    root = revisited_tree(tmp_path / name, name=name, gallery=12)
    metrics, _ = evaluate(_compose(tmp_path, f"data={name}", f"data.root={root}"))
    printed = capsys.readouterr().out
    assert_prints_the_emh_table(printed)
    # the scores are revisitop's rules on the exact ranking of the saved embeddings
    saved = read_embeddings_npz(tmp_path / "out" / "embeddings.npz")
    assert saved.gallery is not None
    truth = pickle.loads((root / f"gnd_{name}.pkl").read_bytes())
    scores = saved.query.astype(np.float64) @ saved.gallery.T.astype(np.float64)
    order = np.arange(saved.gallery.shape[0])
    rankings = np.stack([np.lexsort((order, -row)) for row in scores])
    lists = [
        [np.asarray(g[k], dtype=np.int64) for g in truth["gnd"]] for k in ("easy", "hard", "junk")
    ]
    expected = revisited_rankings(rankings, *lists)
    for setup, got in expected.items():
        assert metrics[f"test/map_{setup}"] == pytest.approx(got.map, abs=1e-6)
        assert metrics[f"test/mp_{setup}@5"] == pytest.approx(got.mp[1], abs=1e-6)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["protocol"]["data"]["protocol"] == "revisited"
    assert (
        report["protocol"]["data"]["queries"] == 2 and report["protocol"]["data"]["gallery"] == 12
    )


def test_gldv2_end_to_end_scores_map_at_100(tmp_path: Path) -> None:
    root = gldv2_tree(tmp_path / "gldv2")
    metrics, _ = evaluate(_compose(tmp_path, "data=gldv2", f"data.root={root}"))
    saved = read_embeddings_npz(tmp_path / "out" / "embeddings.npz")
    assert saved.gallery is not None and saved.query.shape[0] == 1
    gallery_ids = list(saved.gallery_labels)
    relevant = [[gallery_ids.index("aaa111"), gallery_ids.index("bcd333")]]
    expected = evaluate_relevant_lists(saved.query, saved.gallery, relevant, ks=(100,))
    assert metrics["test/map@100"] == pytest.approx(expected.metrics["map@100"], abs=1e-9)
    assert 0.5 <= metrics["test/map@100"] <= 1.0  # 2 of 4 index images relevant


def test_an_unknown_query_name_in_the_gnd_file_is_one_line(tmp_path: Path, capsys) -> None:
    root = revisited_tree(tmp_path / "roxford5k")
    (root / "jpg" / "query_a.jpg").unlink()
    with pytest.raises(SystemExit) as info:  # as python evaluate.py reports it
        reported(evaluate)(_compose(tmp_path, "data=roxford5k", f"data.root={root}"))
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert (
        error.count("\n") == 1 and "gnd_roxford5k.pkl, qimlist[0]: query image 'query_a'" in error
    )


def test_the_whitening_is_learned_on_another_datas_training_split(tmp_path: Path) -> None:
    """cirtorch's protocol: ROxford has no training split, so the learned whitening comes from
    SfM-120k's 3D models (``+data@fit_data=sfm120k``), seen at ROxford's preprocessing (the
    long side at data.image_size)."""
    root = revisited_tree(tmp_path / "roxford5k", gallery=12)
    sfm = sfm120k_tree(tmp_path / "sfm")
    whiten = ["postprocess=[whiten]", "postprocess.whiten.method=learned"]
    overrides = ["data=roxford5k", f"data.root={root}", *whiten]
    with pytest.raises(Exception, match="train"):  # without it: no training split to fit on
        evaluate(_compose(tmp_path / "alone", *overrides))
    evaluate(_compose(tmp_path, *overrides, "+data@fit_data=sfm120k", f"fit_data.root={sfm}"))
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    fitted = report["protocol"]["postprocess"]["fitted_on"]["whiten"]
    assert fitted == {"split": "train", "images": 4, "method": "learned"}  # SfM's train split
    assert report["protocol"]["preprocessing"]["resize_mode"] == "long"
    assert report["protocol"]["data"]["queries"] == 2

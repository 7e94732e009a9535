"""score_bundle and ``retrieval score`` on a real bundle, against a brute-force computation with
the metric functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.cli import main
from retrieval.data.manifest import ManifestRow, write_manifest
from retrieval.evaluation.metrics import micro_average_precision, recall_at_k
from retrieval.search import Retriever
from retrieval.search.score import bundle_label_counts, score_bundle
from tests.bundle_fixtures import Gallery, new_images, transformed_copy

K = 5


@pytest.fixture(scope="module")
def bundle(bundle_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(bundle_template, tmp_path_factory.mktemp("score") / "bundle"))


@pytest.fixture(scope="module")
def queries(gallery: Gallery, tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """Edited copies of 12 gallery images (two edit names) and two images of no bundle label."""
    folder = tmp_path_factory.mktemp("queries")
    out = []
    for i in range(0, 24, 2):
        path = folder / f"copy_{i:02d}.jpg"
        path.write_bytes(transformed_copy(gallery.paths[i]))
        out.append((path, gallery.labels[i], "crop" if i % 4 else "bright"))
    out += [(p, "not-in-bundle", "other") for p in new_images(folder, 2)]
    return out


def brute_force(retriever: Retriever, queries: list[tuple], k: int) -> dict[str, float]:
    """Every query against every stored vector (float64, ties by id), then the metrics."""
    xq = retriever.embed([str(p) for p, _, _ in queries]).astype(np.float64)
    ids = retriever.items.store.active_ids()
    items = retriever.items.store.get(ids.tolist())
    xg = np.stack([item.vector for item in items]).astype(np.float64)
    names = sorted({item.label for item in items} | {label for _, label, _ in queries})
    code = {name: i for i, name in enumerate(names)}
    gallery_codes = np.array([code[item.label] for item in items])
    query_codes = np.array([code[label] for _, label, _ in queries])
    sims = xq @ xg.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    neighbors = gallery_codes[top]
    positives = np.array([(gallery_codes == c).sum() for c in query_codes])
    scored = positives > 0
    relevant = neighbors == query_codes[:, None]
    return {
        "recall@1": float(recall_at_k(neighbors[scored], query_codes[scored], 1).mean()),
        f"recall@{k}": float(recall_at_k(neighbors[scored], query_codes[scored], k).mean()),
        f"micro_ap@{k}": micro_average_precision(
            np.take_along_axis(sims, top, axis=1), relevant, int(positives.sum())
        ),
        "crop": float(relevant[:, :1][np.array([e == "crop" for _, _, e in queries])].mean()),
    }


def test_score_bundle_matches_a_direct_computation(bundle: Path, queries: list[tuple]) -> None:
    with Retriever.load(bundle) as retriever:
        result = score_bundle(retriever, queries, k=K, batch_size=5)
        want = brute_force(retriever, queries, K)
        counts = bundle_label_counts(retriever)
    assert counts and set(counts.values()) == {4}  # 10 labels x 4 images
    assert (result["queries"], result["scored"], result["excluded"]) == (14, 12, 2)
    for name in ("recall@1", f"recall@{K}", f"micro_ap@{K}"):
        assert result[name] == pytest.approx(want[name], abs=1e-6), name
    assert result["recall@1_by_edit"]["crop"] == pytest.approx(want["crop"])
    assert set(result["recall@1_by_edit"]) == {"crop", "bright"}  # "other" queries not scored
    assert result["edit_counts"] == {"bright": 6, "crop": 6}
    assert result["recall@1"] > 0.5  # light edits of gallery images are found
    assert 0 < result[f"micro_ap@{K}"] < 1  # three other relevant items per query: recall lost
    assert result["seconds_per_query"] == pytest.approx(result["seconds"] / 14)


def test_score_bundle_refuses_queries_it_cannot_score(bundle: Path, queries: list[tuple]) -> None:
    with Retriever.load(bundle) as retriever:
        with pytest.raises(ValueError, match="none of the 2 query labels"):
            score_bundle(retriever, queries[-2:])
        with pytest.raises(ValueError, match="no queries"):
            score_bundle(retriever, [])
        with pytest.raises(ValueError, match="k must be"):
            score_bundle(retriever, queries, k=0)


def _manifest(path: Path, gallery: Gallery, queries: list[tuple]) -> Path:
    rows = [
        ManifestRow(p, label, "test", False, True)
        for p, label in zip(gallery.paths, gallery.labels, strict=True)
    ]
    rows += [ManifestRow(p, label, "test", True, False, {"edit": e}) for p, label, e in queries]
    rows.append(ManifestRow(gallery.paths[0], gallery.labels[0], "train", False, False))
    return write_manifest(rows, path)


def test_score_command(
    capsys: pytest.CaptureFixture[str],
    bundle: Path,
    gallery: Gallery,
    queries: list[tuple],
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path / "m.csv", gallery, queries)
    assert main(["score", str(bundle), str(manifest), "-k", str(K), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    with Retriever.load(bundle) as retriever:
        direct = score_bundle(retriever, queries, k=K)
    for name in ("queries", "scored", "recall@1", f"micro_ap@{K}", "recall@1_by_edit"):
        assert payload[name] == pytest.approx(direct[name]), name
    assert main(["score", str(bundle), str(manifest), "-k", str(K)]) == 0
    table = capsys.readouterr().out
    assert "14 queries, 12 scored, 2 without a relevant item" in table
    assert f"micro_ap@{K}" in table and "recall@1 by edit:" in table and "crop" in table


def test_score_command_errors(
    capsys: pytest.CaptureFixture[str], bundle: Path, gallery: Gallery, tmp_path: Path
) -> None:
    pairs = zip(gallery.paths, gallery.labels, strict=True)
    plain = write_manifest(
        [ManifestRow(p, label, "test") for p, label in pairs], tmp_path / "p.csv"
    )
    assert main(["score", str(bundle), str(plain)]) == 2
    assert "no query rows" in capsys.readouterr().err
    gone = _manifest(tmp_path / "gone.csv", gallery, [(tmp_path / "x.jpg", "a", "crop")])
    assert main(["score", str(bundle), str(gone)]) == 2
    assert "1 of 1 query images do not exist" in capsys.readouterr().err
    assert main(["score", str(bundle), str(plain), "--split", "val"]) == 2
    assert "no rows with split 'val'" in capsys.readouterr().err

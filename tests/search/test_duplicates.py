"""Duplicate groups: the kNN-graph grouping against a naive all-pairs one, no chaining, keeper
rules and protected files, exact copies by bytes and by pixels, calibration, the command's
JSON, and moves that undo (a crash half-way included)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.cli import main
from retrieval.infra import moves
from retrieval.infra.moves import MoveError, move_files, undo_moves
from retrieval.search.duplicates import (
    FileFacts,
    Normalisation,
    calibrate,
    group_duplicates,
    keep_ranks,
    neighbour_graph,
    pair_counts,
    threshold_for,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(seed: int, n_clusters: int = 12, per: int = 5, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    x = np.repeat(centres, per, axis=0) + rng.normal(scale=0.35, size=(n_clusters * per, dim))
    x = _unit(x)
    x[7] = x[3]  # exact duplicates: equal scores must come out one way
    x[20] = x[3]
    x[30] = x[11]  # the same bytes (see _facts)
    return x


def _naive_groups(
    x: np.ndarray, facts: list[FileFacts], threshold: float, norm: Normalisation | None = None
) -> list[list[int]]:
    """The grouping rule written plainly over the full similarity matrix."""
    n = len(x)
    sims = x @ x.T
    if norm is not None:  # minus the mean of the two background similarities
        others = np.sort(np.where(np.eye(n, dtype=bool), -np.inf, sims), axis=1)[:, ::-1]
        kth = others[:, norm.k - 1] if n - 1 >= norm.k else np.full(n, norm.floor)
        background = np.maximum(kth, norm.floor)
        sims = sims - (background[:, None] + background[None, :]) / 2
    ranks = keep_ranks(facts)
    key_of = list(range(n))  # exact sets by sha256: the smallest row
    for i in range(n):
        for j in range(i):
            if facts[i].sha256 is not None and facts[i].sha256 == facts[j].sha256:
                key_of[i] = key_of[j]
                break
    keys = sorted(set(key_of))
    rep = {
        key: min((r for r in range(n) if key_of[r] == key), key=lambda r: ranks[r]) for key in keys
    }
    links = {a: [b for b in keys if b != a and sims[rep[a], rep[b]] >= threshold] for a in keys}
    assigned: set[int] = set()
    groups = []
    for centre in sorted(keys, key=lambda key: (-len(links[key]), key)):
        if centre in assigned:
            continue
        offered = sorted(
            (b for b in links[centre] if b not in assigned),
            key=lambda b: (-sims[rep[b], rep[centre]], b),
        )
        members = [centre]
        for b in offered:  # average linkage: its mean score with the members so far
            if sum(sims[rep[b], rep[m]] for m in members) / len(members) >= threshold:
                members.append(b)
        assigned.update(members)
        rows = [r for key in members for r in range(n) if key_of[r] == key]
        if len(rows) > 1:
            groups.append(sorted(rows))
    return sorted(groups)


def _facts(n: int, seed: int = 0) -> list[FileFacts]:
    rng = np.random.default_rng(seed)
    return [
        FileFacts(
            f"/p/{i:03d}.jpg",
            int(rng.integers(1, 5)) * 1000,
            int(rng.integers(1, 4)) * 10,
            10,
            float(rng.integers(0, 3)),
            sha256="same" if i in (11, 30) else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("threshold", "norm"),
    [
        (0.5, None),
        (0.7, None),
        (0.85, None),
        (0.1, Normalisation(4, 0.3)),
        (0.3, Normalisation(6, 0.0)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_graph_groups_equal_naive_grouping(
    seed: int, threshold: float, norm: Normalisation | None
) -> None:
    x = _clusters(seed)
    facts = _facts(len(x), seed)
    got = group_duplicates(x, facts, threshold, k=len(x), norm=norm)
    assert sorted(sorted(m.row for m in g.members) for g in got) == _naive_groups(
        x, facts, threshold, norm
    )
    graph = neighbour_graph(x, threshold, k=len(x), norm=norm)
    ranks = keep_ranks(facts)
    for group in got:  # one member (the centre) has every other within the threshold
        keeper = group.members[0]
        assert keeper.kind == "keeper" and keeper.keep
        assert keeper.row == min((m.row for m in group.members), key=lambda r: ranks[r])
        rows = np.array([m.row for m in group.members])
        scores = np.stack([graph.pair_scores(x, rows, int(c)) for c in rows])
        same = np.array(
            [[a.kind != "near" and b.kind != "near" for b in group.members] for a in group.members]
        )  # the keeper's exact copies score 1.0
        assert ((scores >= threshold - 1e-6) | same | np.eye(len(rows), dtype=bool)).all(1).any()
        for m in group.members[1:]:
            score = float(graph.pair_scores(x, np.array([m.row]), keeper.row)[0])
            assert m.kind == "exact" or m.score == pytest.approx(score, abs=1e-6)


def test_normalisation_needs_more_in_a_crowd() -> None:
    """Two pairs equally similar: the one in a crowd of look-alikes scores lower."""
    rng = np.random.default_rng(5)
    crowd = _unit(np.array([1.0, 0, 0, 0]) + 0.2 * rng.normal(size=(12, 4)))
    lone = _unit(np.array([[0, 0, 1.0, 0], [0, 0.2, 1.0, 0]]))
    x = np.concatenate([crowd, lone, _unit(rng.normal(size=(30, 4)) + [0, 0, 0, 3])])
    norm = Normalisation(5, 0.0)
    graph = neighbour_graph(x, -1.0, k=len(x) - 1, norm=norm)
    assert graph.background is not None
    assert graph.background[:12].min() > graph.background[12:14].max()
    pair = [int(np.argmax(x[:12] @ x[0] * (np.arange(12) != 0)))]
    crowd_raw = float(x[0] @ x[pair[0]])
    lone_raw = float(x[12] @ x[13])
    crowd_norm = float(graph.pair_scores(x, np.array(pair), 0)[0])
    lone_norm = float(graph.pair_scores(x, np.array([13]), 12)[0])
    assert crowd_norm - lone_norm < crowd_raw - lone_raw


def test_a_burst_does_not_chain() -> None:
    angles = np.deg2rad(np.arange(40) * 15.0)  # each frame 15 degrees from the next
    x = _unit(np.stack([np.cos(angles / 8), np.sin(angles / 8), np.zeros(40)], axis=1))
    step = float(x[0] @ x[1])
    threshold = float(x[0] @ x[2]) - 1e-4  # two steps apart is still a copy, three is not
    assert step > threshold
    groups = group_duplicates(x, [FileFacts(f"f{i:02d}") for i in range(40)], threshold)
    assert len(groups) > 5
    for group in groups:
        rows = [m.row for m in group.members]
        assert max(rows) - min(rows) <= 4  # never a chain of frames: two steps from a centre
        assert any(all(abs(r - c) <= 2 for r in rows) for c in rows)


def test_two_photos_are_not_joined_through_a_third() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.5, np.sqrt(0.75)])  # cos 0.5
    middle = _unit((a + b)[None])[0]  # cos 0.87 to each
    x = _unit(np.stack([a, middle, b]))
    groups = group_duplicates(x, [FileFacts(p) for p in "abc"], threshold=0.8)
    assert len(groups) == 1 and len(groups[0].members) == 2  # middle joins one, not both


def test_keep_rules_and_protected_files() -> None:
    facts = [
        FileFacts("/a/small-old.jpg", bytes=100, width=10, height=10, date=1.0),
        FileFacts("/a/big-new.jpg", bytes=50, width=20, height=20, date=3.0),
        FileFacts("/a/big-heavy.jpg", bytes=900, width=20, height=20, date=2.0),
        FileFacts("/keep/small.jpg", bytes=10, width=5, height=5, date=4.0, protected=True),
    ]
    assert keep_ranks(facts, "largest").tolist() == [3, 2, 1, 0]  # protected first, then pixels
    assert keep_ranks(facts, "oldest").tolist() == [1, 3, 2, 0]
    assert keep_ranks(facts, "newest").tolist() == [3, 1, 2, 0]
    assert keep_ranks(facts, "path").tolist() == [3, 2, 1, 0]
    x = _unit(np.array([[1.0, 0.01], [1.0, 0.02], [1.0, 0.03], [1.0, 0.0]]))
    (group,) = group_duplicates(x, [*facts[:3], FileFacts("/keep/p.jpg", 10, 5, 5, 4.0)], 0.9)
    assert group.members[0].path == "/a/big-heavy.jpg"  # most pixels, then the larger file
    assert [m.keep for m in group.members] == [True, False, False, False]
    (group,) = group_duplicates(x, facts, 0.9)
    kept = [m.path for m in group.members if m.keep]
    assert kept == ["/keep/small.jpg"] and group.members[0].path == "/keep/small.jpg"
    with pytest.raises(ValueError, match="--keep"):
        keep_ranks(facts, "biggest")


def test_exact_copies_by_bytes_and_by_pixels() -> None:
    x = _unit(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    facts = [
        FileFacts("a", sha256="h1"),
        FileFacts("b", sha256="h1"),
        FileFacts("c", sha256="h2"),
        FileFacts("d", sha256="h3"),
    ]
    (group,) = group_duplicates(x, facts, 0.999, same_pixels=lambda i, j: {i, j} == {0, 2})
    assert group.kind == "exact" and sorted(m.path for m in group.members) == ["a", "b", "c"]
    (group,) = group_duplicates(x, facts, 0.999, same_pixels=lambda i, j: False)
    assert [m.to_dict()["kind"] for m in group.members] == ["exact", "exact", "near"]


def test_calibration_counts_pairs_as_a_naive_count() -> None:
    x = _clusters(3)
    labels = np.repeat(np.arange(12), 5)
    table = calibrate(x, labels, thresholds=[0.5, 0.7, 0.9])
    for row in table:
        groups = group_duplicates(
            x, [FileFacts(str(i)) for i in range(len(x))], row["threshold"], keep="path"
        )
        together = {
            (a.row, b.row) for g in groups for a in g.members for b in g.members if a.row < b.row
        }
        true = sum(labels[a] == labels[b] for a, b in together)
        assert pair_counts(groups, labels) == (len(together), true)
        known = {0, 1, 2}
        touching = [(a, b) for a, b in together if labels[a] in known or labels[b] in known]
        true_known = sum(labels[a] == labels[b] for a, b in touching)
        assert pair_counts(groups, labels, known) == (len(touching), true_known)
        assert row["recall"] == pytest.approx(true / (12 * 10))
    assert threshold_for(table, min(r["precision"] for r in table)) == 0.5
    with pytest.raises(ValueError, match="no calibrated threshold"):
        threshold_for([{"threshold": 0.5, "precision": 0.2}], 0.99)


def _png(path: Path, colour: tuple[int, int, int], size: int = 48, **save: object) -> Path:
    image = Image.new("RGB", (size, size), colour)
    for i in range(size):
        image.putpixel((i, i), (255 - colour[0], 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


@pytest.fixture
def photo_folder(tmp_path: Path, gallery) -> Path:  # noqa: ANN001
    """Four demo photos, a byte copy, a pixel copy (another PNG encoding) and an edited copy."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    for i, path in enumerate(gallery.paths[:16:4]):
        (root / "a" / f"p{i}.jpg").write_bytes(path.read_bytes())
    (root / "b").mkdir()
    (root / "b" / "p0-copy.jpg").write_bytes((root / "a" / "p0.jpg").read_bytes())
    Image.open(root / "a" / "p1.jpg").save(root / "b" / "p1.png", compress_level=1)
    Image.open(root / "a" / "p1.jpg").save(root / "b" / "p1-again.png", compress_level=9)
    from tests.bundle_fixtures import transformed_copy

    (root / "b" / "p2-edit.jpg").write_bytes(transformed_copy(root / "a" / "p2.jpg"))
    return root


def _run_json(capsys, *args: str) -> dict:  # noqa: ANN001
    assert main(["duplicates", *args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_command_json_schema_and_cache(
    photo_folder: Path, bundle_template: Path, capsys, tmp_path: Path
) -> None:  # noqa: ANN001
    cache = str(tmp_path / "cache")
    args = [
        str(photo_folder),
        "--model",
        str(bundle_template),
        "--threshold",
        "0.9",
        "--cache",
        cache,
    ]
    out = _run_json(capsys, *args)
    assert set(out) >= {"threshold", "groups"} and out["threshold"] == 0.9
    member_keys = {"path", "kind", "score", "keep", "width", "height", "bytes"}
    for group in out["groups"]:
        assert len(group) >= 2 and group[0]["keep"] and set(group[0]) == member_keys
        assert all(m["kind"] in ("exact", "near") for m in group)
    by_path = {Path(m["path"]).name: (i, m) for i, g in enumerate(out["groups"]) for m in g}
    assert by_path["p0.jpg"][0] == by_path["p0-copy.jpg"][0]
    assert by_path["p1.png"][0] == by_path["p1-again.png"][0] == by_path["p1.jpg"][0]
    assert {by_path[n][1]["kind"] for n in ("p0-copy.jpg", "p0.jpg")} == {"exact"}
    assert by_path["p2-edit.jpg"][0] == by_path["p2.jpg"][0]
    assert by_path["p2-edit.jpg"][1]["kind"] == "near"
    assert _run_json(capsys, *args) == out  # the second run reads the cache: same answer
    assert main(["duplicates", *args, "--quiet"]) == 0
    assert "threshold 0.9000 (given, cosine similarity)" in capsys.readouterr().err


def test_move_and_undo_round_trip(
    photo_folder: Path, bundle_template: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    before = {p: p.read_bytes() for p in photo_folder.rglob("*") if p.is_file()}
    aside, journal = tmp_path / "aside", tmp_path / "undo.jsonl"
    args = [
        "duplicates",
        str(photo_folder),
        "--model",
        str(bundle_template),
        "--threshold",
        "0.9",
        "--no-cache",
        "--quiet",
        "--protect",
        str(photo_folder / "b"),
    ]
    assert main([*args, "--move-to", str(aside), "--journal", str(journal)]) == 0
    moved = sorted(p.relative_to(aside) for p in aside.rglob("*") if p.is_file())
    assert moved and all(p.parts[0] == "a" for p in moved)  # b/ is protected
    assert all(not (photo_folder / p).exists() for p in moved)
    assert main(["duplicates", "--undo", str(journal)]) == 0
    assert {p: p.read_bytes() for p in photo_folder.rglob("*") if p.is_file()} == before


def test_a_move_that_dies_half_way_can_be_undone(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    root = tmp_path / "root"
    files = [_png(root / f"d{i % 2}" / f"f{i}.png", (10 * i, 5, 5)) for i in range(6)]
    before = {p: p.read_bytes() for p in files}
    calls = {"n": 0}
    real = moves._move_one

    def dying(origin: Path, target: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        real(origin, target)

    monkeypatch.setattr(moves, "_move_one", dying)
    journal = tmp_path / "j.jsonl"
    with pytest.raises(MoveError, match="3 file"):
        move_files(files, root, tmp_path / "aside", journal)
    monkeypatch.setattr(moves, "_move_one", real)
    for path in files:  # each file in place, or moved and recorded
        target = tmp_path / "aside" / path.relative_to(root)
        assert path.exists() != target.exists()
        assert path.exists() or str(path) in journal.read_text()
    with open(journal, "a", encoding="utf-8") as handle:  # a record cut short by the crash
        handle.write('{"move": "/x')
    report = undo_moves(journal)
    assert len(report.moved) == 3 and not report.problems
    assert {p: p.read_bytes() for p in files} == before


def test_moves_refuse_clashes_and_bad_places(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = [_png(root / f"f{i}.png", (i, 0, 0)) for i in range(3)]
    _png(tmp_path / "aside" / "f1.png", (9, 9, 9))
    with pytest.raises(MoveError, match="already exists"):
        move_files(files, root, tmp_path / "aside", tmp_path / "j1.jsonl")
    with pytest.raises(MoveError, match="outside the folder"):
        move_files(files, root, root / "sub", tmp_path / "j2.jsonl")
    with pytest.raises(MoveError, match="not under"):
        move_files([_png(tmp_path / "x.png", (1, 1, 1))], root, tmp_path / "b", tmp_path / "j3")
    assert all(p.exists() for p in files) and not (tmp_path / "j1.jsonl").exists()


def test_command_errors_are_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    empty = tmp_path / "empty"
    empty.mkdir()
    folder = tmp_path / "f"
    _png(folder / "a.png", (1, 2, 3))
    cases = [
        ([str(empty)], "no image"),
        ([str(folder), "--threshold", "1.5"], "not a similarity in [-1, 1]"),
        ([str(folder), "--protect", str(tmp_path)], "not inside the target"),
        ([str(tmp_path / "missing")], "neither a folder nor a bundle"),
    ]
    for args, message in cases:
        assert main(["duplicates", *args, "--quiet", "--no-cache"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and message in err[-1], err


def test_exif_date_is_read() -> None:
    from retrieval.search.duplicate_finder import exif_date

    image = Image.new("RGB", (8, 8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2001:02:03 04:05:06"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    assert exif_date(Image.open(buffer)) == 981173106.0
    assert exif_date(Image.new("RGB", (4, 4))) is None


def test_calibration_of_a_bundle_from_families_of_copies(gallery, bundle_copy: Path) -> None:  # noqa: ANN001
    """Every threshold scored on families of copies among distractors, the default the lowest
    reaching the precision asked; stored in the manifest without touching the checksums."""
    from retrieval.bundle.format import read_manifest, update_manifest, verify_files
    from retrieval.search.duplicate_finder import calibration

    # labels 0-5 keep their four images (families), the other labels one each (distractors)
    rows = [i for i, label in enumerate(gallery.labels) if label < gallery.labels[24] or i % 4 == 0]
    labels = [gallery.labels[i] for i in rows]
    found = calibration(gallery.vectors[rows], labels, "a test", precision=0.5, norm_k=5)
    table = found["table"]
    assert [r["threshold"] for r in table] == sorted(r["threshold"] for r in table)
    assert all(0 <= r["recall"] <= 1 for r in table) and found["normalisation"]["k"] == 5
    fits = [r["threshold"] for r in table if r["precision"] >= 0.5]
    assert fits and found["threshold"] == min(fits)
    assert found["calibrated_on"].startswith("a test: ")
    update_manifest(bundle_copy, duplicates=found)
    verify_files(bundle_copy, read_manifest(bundle_copy))
    assert read_manifest(bundle_copy)["duplicates"]["threshold"] == found["threshold"]


def test_bundle_items_with_relative_uris_are_read_from_the_bundle_folder(
    bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item uri relative to the bundle (what a bundle moved with its pictures holds) names
    the file under the bundle's folder, wherever the command runs: its size and pixels are
    read there, and that is the path a move would act on."""
    import sqlite3

    from retrieval.search import Retriever

    with sqlite3.connect(bundle_copy / "items.sqlite") as db:
        label = db.execute("SELECT label FROM items WHERE removed_seq IS NULL").fetchone()[0]
        rows = db.execute(
            "SELECT id, uri FROM items WHERE removed_seq IS NULL AND label = ? LIMIT 2", (label,)
        ).fetchall()
        (bundle_copy / "pics").mkdir()
        for item_id, uri in rows:
            relative = f"pics/{Path(uri).name}"
            shutil.copyfile(uri, bundle_copy / relative)
            db.execute("UPDATE items SET uri = ? WHERE id = ?", (relative, item_id))
    monkeypatch.chdir(tmp_path)  # not the bundle's folder
    with Retriever.load(bundle_copy, read_only=True) as retriever:
        report = retriever.duplicates(threshold=0.3)  # two pictures of one label: grouped
    members = [m for group in report.groups for m in group.members]
    moved = [m for m in members if "/pics/" in str(m.path)]
    assert moved, "the items with relative uris are in no group"
    for member in moved:
        assert Path(member.path).is_file() and Path(member.path).is_relative_to(bundle_copy)
        assert member.width is not None and member.bytes is not None

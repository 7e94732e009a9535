"""Distractors (R1M) scored shard by shard equal the same distractors appended to the gallery in
one piece: ranks, ties (a gallery item before an equal distractor), exact duplicates, first
results, whitening; read from a real shards folder; bad input refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.data.manifest import ManifestError
from retrieval.datasets.gnd import distractor_images
from retrieval.evaluation.distractors import merge_top, scan_distractors
from retrieval.evaluation.listed import evaluate_revisited
from retrieval.index.shards import ShardContent, ShardItem, ShardPlan, ShardSet, embed_shards
from retrieval.postprocess import AQE, DBA, Postprocess, Whiten, fit_whitening


def _exact_pool(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    """n unit vectors, each four entries of +-0.5 and the rest 0: every inner product is a
    multiple of 1/4, exact in float32 in any order of summation, so scores tie exactly."""
    x = np.zeros((n, d), dtype=np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lists(rng: np.random.Generator, nq: int, ng: int):
    easy, hard, junk = [], [], []
    for q in range(nq):
        chosen = rng.permutation(ng)
        n_e, n_h, n_j = rng.integers(0, 5, size=3)
        n_e = 0 if q % 3 == 0 else n_e  # left out of the easy setup
        easy.append(chosen[:n_e])
        hard.append(chosen[n_e : n_e + n_h])
        junk.append(chosen[n_e + n_h : n_e + n_h + n_j])
    easy[1] = hard[1] = np.zeros(0, dtype=np.int64)  # no positive at all: left out
    return easy, hard, junk


def _blocks(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """``x`` cut into consecutive blocks of ``sizes`` (0 allowed), the rest in a last block."""
    cuts = np.cumsum(sizes)
    assert cuts[-1] <= len(x)
    return np.split(x, cuts)


def _assert_same(got, want) -> None:
    assert got.metrics.keys() == want.metrics.keys()
    for name, value in want.metrics.items():
        assert got.metrics[name] == pytest.approx(value, abs=1e-12), name
    np.testing.assert_array_equal(got.query_rows, want.query_rows)
    for name, values in want.per_query.items():
        np.testing.assert_allclose(got.per_query[name], values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.neighbor_ids, want.neighbor_ids)
    np.testing.assert_array_equal(got.neighbor_scores, want.neighbor_scores)


@pytest.mark.parametrize("seed", range(4))
def test_shard_by_shard_equals_the_distractors_appended_in_one_piece(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    nq, ng, nd = 7, 40, 150
    xq, xg, xd = _exact_pool(rng, nq), _exact_pool(rng, ng), _exact_pool(rng, nd)
    easy, hard, junk = _lists(rng, nq, ng)
    listed = np.concatenate([*easy, *hard, *junk])
    xd[rng.choice(nd, 20, replace=False)] = xg[rng.choice(listed, 20)]  # exact duplicates
    assert ((xd[:, None, :] == xg[None, :, :]).all(-1)).sum() >= 20
    keep = 25
    want = evaluate_revisited(xq, np.concatenate([xg, xd]), easy, hard, junk, keep_neighbors=keep)
    products: list[tuple[int, int]] = []
    mm = torch.mm

    def recorded(a, b, **kwargs):
        products.append((a.shape[0], b.shape[1]))
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recorded)
    sizes = [1, 9, 0, 13, 31, 50]  # several tiny shards, an empty one, the rest (46) last
    got = evaluate_revisited(
        xq,
        xg,
        easy,
        hard,
        junk,
        keep_neighbors=keep,
        chunk_size=3,
        distractors=iter(_blocks(xd, sizes)),
    )
    _assert_same(got, want)
    assert got.index["distractors"] == nd
    assert (got.neighbor_ids >= ng).any() and (got.neighbor_ids < ng).any()
    # memory: one shard and one chunk of queries at a time, never all distractors at once
    assert products and max(cols for _, cols in products) <= max(ng, 50)
    assert max(rows for rows, _ in products) <= 3


def test_a_tie_ranks_the_gallery_item_before_the_distractor():
    xq = np.array([[1.0, 0.0]], dtype=np.float32)
    xg = np.array([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], dtype=np.float32)  # scores 0, .6, 1
    xd = np.array([[0.6, 0.8], [0.8, 0.6], [0.6, 0.8]], dtype=np.float32)  # .6, .8, .6
    scan = scan_distractors(xq, [np.array([0.0, 0.6, 1.0], np.float32)], [xd[:1], xd[1:]], keep=3)
    np.testing.assert_array_equal(scan.above[0], [3, 1, 0])  # strictly above only
    np.testing.assert_array_equal(scan.top_ids, [[1, 0, 2]])  # equal scores: ascending number
    np.testing.assert_allclose(scan.top_scores, [[0.8, 0.6, 0.6]], atol=1e-7)
    easy, hard, junk = [[1]], [[0]], [[]]
    got = evaluate_revisited(xq, xg, easy, hard, junk, keep_neighbors=6, distractors=[xd])
    # one-piece ranking: g2 (1.0), d1 (.8), g1 (.6, before the equal d0, d2), d0, d2, g0
    np.testing.assert_array_equal(got.neighbor_ids, [[2, 4, 1, 3, 5, 0]])
    assert got.metrics["map_easy"] == pytest.approx(1 / 6)  # g1 at rank 3: (0 + 1/3) / 2
    # had the tie gone to the distractors, g1 would be 5th
    assert got.metrics["map_easy"] != pytest.approx(1 / 10)


def test_merge_top_puts_missing_results_last():
    scores, ids = merge_top(
        [np.array([[0.5, -np.inf]]), np.array([[0.5, 0.9]])],
        [np.array([[7, -1]]), np.array([[3, 8]])],
        3,
    )
    np.testing.assert_array_equal(ids, [[8, 3, 7]])
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.5]])


@pytest.mark.parametrize("fit_on", ["train", "gallery"])
def test_whitening_applies_to_the_distractors_as_to_the_gallery(fit_on):
    rng = np.random.default_rng(11)
    nq, ng, nd, d = 6, 60, 120, 16
    xq, xg, xd = _unit(rng, nq, d), _unit(rng, ng, d), _unit(rng, nd, d)
    easy, hard, junk = _lists(rng, nq, ng)
    fitted = fit_whitening(xg, dim=12, shrinkage=0.1)  # fitted on the gallery alone
    given = Postprocess(whiten=Whiten(dim=12, shrinkage=0.1, fit_on="train"))
    want = evaluate_revisited(
        xq,
        np.concatenate([xg, xd]),
        easy,
        hard,
        junk,
        keep_neighbors=10,
        postprocess=given,
        whitening=fitted,
    )
    steps = Postprocess(whiten=Whiten(dim=12, shrinkage=0.1, fit_on=fit_on))
    got = evaluate_revisited(
        xq,
        xg,
        easy,
        hard,
        junk,
        keep_neighbors=10,
        postprocess=steps,
        whitening=fitted if fit_on == "train" else None,
        distractors=_blocks(xd, [17, 40]),
    )
    assert got.metrics.keys() == want.metrics.keys()
    for name, value in want.metrics.items():
        assert got.metrics[name] == pytest.approx(value, abs=1e-9), name
    np.testing.assert_array_equal(got.neighbor_ids, want.neighbor_ids)
    plain = evaluate_revisited(xq, xg, easy, hard, junk, distractors=[xd])
    assert plain.metrics != got.metrics  # the whitening changed what was scored


def _write_shards(folder, xd: np.ndarray, shard_size: int) -> ShardSet:
    items = [ShardItem(f"/r1m/jpg/{i:04d}.jpg", "distractor") for i in range(len(xd))]
    plan = ShardPlan(items, shard_size)

    def embed(shard: int, chosen: list[ShardItem]) -> ShardContent:
        start = shard * shard_size
        return ShardContent(xd[start : start + len(chosen)], chosen)

    header = {"dim": xd.shape[1], "model_fingerprint": "test", "preprocessing": {}}
    embed_shards(folder, plan, header, embed)
    return ShardSet.open(folder)


def test_a_shards_folder_is_read_one_shard_at_a_time(tmp_path):
    rng = np.random.default_rng(2)
    xq, xg, xd = _exact_pool(rng, 5), _exact_pool(rng, 30), _exact_pool(rng, 64)
    easy, hard, junk = _lists(rng, 5, 30)
    shards = _write_shards(tmp_path / "shards", xd, shard_size=10)
    assert shards.counts == [10] * 6 + [4]
    blocks = list(shards.shard_vectors())
    assert [b.shape for b in blocks] == [(10, 8)] * 6 + [(4, 8)]
    assert isinstance(blocks[0], np.memmap)  # read from disk, not held
    want = evaluate_revisited(xq, np.concatenate([xg, xd]), easy, hard, junk, keep_neighbors=8)
    got = evaluate_revisited(
        xq, xg, easy, hard, junk, keep_neighbors=8, distractors=shards.shard_vectors()
    )
    _assert_same(got, want)
    assert [i.uri for i in shards.items_at([63, 0, 10])] == [
        "/r1m/jpg/0063.jpg",
        "/r1m/jpg/0000.jpg",
        "/r1m/jpg/0010.jpg",
    ]
    with pytest.raises(IndexError):
        shards.items_at([64])


@pytest.mark.parametrize("step", [Postprocess(dba=DBA()), Postprocess(aqe=AQE())])
def test_dba_and_aqe_are_refused_with_distractors_in_one_line(step):
    rng = np.random.default_rng(0)
    xq, xg = _unit(rng, 3, 8), _unit(rng, 20, 8)
    easy, hard, junk = _lists(rng, 3, 20)
    with pytest.raises(ValueError) as info:
        evaluate_revisited(xq, xg, easy, hard, junk, postprocess=step, distractors=[xg[:2]])
    assert "dba and aqe" in str(info.value) and "\n" not in str(info.value)


def test_a_distractor_block_of_another_width_is_named():
    rng = np.random.default_rng(0)
    xq, xg = _unit(rng, 3, 8), _unit(rng, 20, 8)
    easy, hard, junk = _lists(rng, 3, 20)
    with pytest.raises(ValueError, match="distractor block 1"):
        evaluate_revisited(xq, xg, easy, hard, junk, distractors=[xg[:2], _unit(rng, 2, 6)])


def _r1m_tree(root, names: list[str]) -> None:
    for name in names:
        path = root / "jpg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (root / "revisitop1m.txt").write_text("\n".join(n.removesuffix(".jpg") for n in names) + "\n")


def test_the_r1m_list_is_read_in_its_order_under_jpg(tmp_path):
    _r1m_tree(tmp_path, ["b/2.jpg", "a/1.jpg", "c.jpg"])
    jpg = tmp_path / "jpg"
    assert distractor_images(tmp_path) == [jpg / "b/2.jpg", jpg / "a/1.jpg", jpg / "c.jpg"]
    assert distractor_images(tmp_path, list_file=None) == [
        jpg / "a/1.jpg",
        jpg / "b/2.jpg",
        jpg / "c.jpg",
    ]


def test_bad_r1m_input_is_one_line_naming_the_file_and_fix(tmp_path):
    _r1m_tree(tmp_path, ["a.jpg", "b.jpg"])
    (tmp_path / "jpg" / "b.jpg").unlink()
    with pytest.raises(ManifestError) as info:
        distractor_images(tmp_path)
    message = str(info.value)
    assert "revisitop1m.txt, line 2" in message and "b.jpg is missing" in message
    assert "extract" in message and "\n" not in message
    (tmp_path / "revisitop1m.txt").write_text("../../etc/passwd\n")
    with pytest.raises(ManifestError, match="line 1: '../../etc/passwd' is not a path under"):
        distractor_images(tmp_path)
    (tmp_path / "revisitop1m.txt").unlink()
    with pytest.raises(ManifestError) as info:
        distractor_images(tmp_path)
    message = str(info.value)
    assert "revisitop1m.txt is missing" in message and "list_file=null" in message
    assert "\n" not in message
    with pytest.raises(ManifestError, match="is not an existing folder"):
        distractor_images(tmp_path / "nowhere")

"""``embed(cfg)``: images -> resumable shards, split across workers; kills lose only the shard
being written, and reruns never recompute finished shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import retrieval.tasks.embed as embed_task
from retrieval.data.images import open_rgb as load_rgb
from retrieval.data.transforms import eval_transform
from retrieval.datasets.demo import render_demo_image
from retrieval.index import ShardSet
from retrieval.index.shards import ShardError, shard_files, shard_problem, worker_identity
from retrieval.tasks.config import compose_config
from retrieval.tasks.embed import embed

ROOT = Path(__file__).resolve().parents[2]


def make_images(root: Path, count: int, size: int = 64) -> list[Path]:
    """``count`` demo images in 3 label folders, and one broken file (listed last)."""
    paths = []
    for i in range(count):
        folder = root / f"label{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i:03d}.jpg")
        render_demo_image(3, i % 3, i, image_size=size).save(paths[-1], quality=90)
    (root / "label0" / "broken.jpg").write_bytes(b"not a jpeg")
    return sorted(paths)


def compose_embed(tmp_path: Path, *overrides: str):
    return compose_config(
        [
            f"paths.output_dir={tmp_path}/out",
            f"paths.log_dir={tmp_path}/logs",
            "image_size=64",
            "num_workers=0",
            "inference.batch_size=4",
            *overrides,
        ],
        name="embed",
    )


class Counter:
    """Wraps ``embed_loader``: counts calls, raises on call ``fail_on`` (1-based)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls, self.fail_on, self.real = 0, fail_on, embed_task.embed_loader

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("killed mid-way")
        return self.real(*args, **kwargs)


def stats(folder: Path, shards: list[int]) -> dict[Path, tuple[int, int]]:
    files = [f for s in shards for f in shard_files(folder, s)]
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("images").resolve()
    return root, make_images(root, 10)


def test_shards_hold_the_models_embeddings_in_item_order(images, tmp_path):
    root, paths = images
    out = tmp_path / "shards"
    with pytest.warns(UserWarning, match="skipping 1 of 3 images of shard 1"):
        summary, objects = embed(
            compose_embed(tmp_path, f"images={root}", f"out_dir={out}", "shard_size=3")
        )
    assert summary == {"out_dir": str(out), "shards": 4, "embedded": 4, "kept": 0}
    shards = ShardSet.open(out)
    assert shards.counts == [3, 2, 3, 2] and shards.count == 10
    assert shards.header["items"] == 11 and shards.header["preprocessing"]["input_size"] == 64
    assert shards.skipped() == [(str(root / "label0" / "broken.jpg"), shards.skipped()[0][1])]
    items = [item for s in range(4) for item in shards.items(s)]
    assert [Path(i.uri) for i in items] == paths
    assert [i.label for i in items] == [p.parent.name for p in paths]
    assert all(i.sha256 and len(i.sha256) == 64 for i in items)
    vectors = np.concatenate([np.load(f) for f in shards.files])
    model = objects["model"].embedder.eval()
    # a backbone as-is sees the whole image squashed (tasks.models.bundle_input)
    transform = eval_transform(model.preprocessing.with_size(64, "squash"))
    with torch.inference_mode():
        expected = model(torch.stack([transform(load_rgb(p)) for p in paths])).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    shards.verify()


def test_a_rerun_after_a_failure_embeds_only_the_unfinished_shards(images, tmp_path, monkeypatch):
    root, _ = images
    out = tmp_path / "shards"
    cfg = compose_embed(tmp_path, f"images={root}", f"out_dir={out}", "shard_size=3")
    failing = Counter(fail_on=2)
    monkeypatch.setattr(embed_task, "embed_loader", failing)
    with pytest.raises(RuntimeError, match="killed mid-way"), pytest.warns(UserWarning):
        embed(cfg)
    assert shard_problem(out, 0, 1280) is None
    assert not any(shard_problem(out, s, 1280) is None for s in (1, 2, 3))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    before = stats(out, [0])

    counting = Counter()
    monkeypatch.setattr(embed_task, "embed_loader", counting)
    with pytest.warns(UserWarning):
        summary, _ = embed(cfg)
    assert counting.calls == 3 and (summary["embedded"], summary["kept"]) == (3, 1)
    assert stats(out, [0]) == before  # shard 0 neither rewritten nor replaced
    counting.calls = 0
    assert embed(cfg)[0]["kept"] == 4 and counting.calls == 0


def test_half_written_shards_never_look_finished(images, tmp_path, monkeypatch):
    root, _ = images
    out = tmp_path / "shards"
    cfg = compose_embed(tmp_path, f"images={root}", f"out_dir={out}", "shard_size=4")
    with pytest.warns(UserWarning):
        embed(cfg)
    npy0, ids0 = shard_files(out, 0)
    npy0.write_bytes(npy0.read_bytes()[:-100])  # truncated after it was recorded
    ids1 = shard_files(out, 1)[1]
    ids1.unlink()  # killed between writing the .npy and its .ids.json
    (out / ".shard-00001.ids.json.abc.tmp").write_bytes(b"half")  # killed inside a write
    assert shard_problem(out, 0, 1280).startswith("damaged")
    assert shard_problem(out, 1, 1280) == "not written" and shard_problem(out, 2, 1280) is None
    with pytest.raises(ShardError, match="2 of 3 shards are not finished"):
        ShardSet.open(out)
    counting = Counter()
    monkeypatch.setattr(embed_task, "embed_loader", counting)
    with pytest.warns(UserWarning):
        summary, _ = embed(cfg)
    assert counting.calls == 2 and summary["embedded"] == 2
    ShardSet.open(out).verify()
    assert not (out / ".shard-00001.ids.json.abc.tmp").exists()


def test_workers_split_the_shards_and_a_foreign_plan_is_refused(images, tmp_path, monkeypatch):
    root, _ = images
    out = tmp_path / "shards"
    args = (f"images={root}", f"out_dir={out}", "shard_size=2")
    first = embed(compose_embed(tmp_path, *args, "rank=1", "world_size=2"))[1]["done"]
    assert first == {"embedded": [1, 3, 5], "kept": []}
    with pytest.raises(ShardError, match="3 of 6 shards are not finished"):
        ShardSet.open(out)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.warns(UserWarning, match="of shard 2"):  # the broken image is in shard 2
        second = embed(compose_embed(tmp_path, *args))[1]["done"]
    assert second == {"embedded": [0, 2, 4], "kept": []}
    assert ShardSet.open(out).count == 10
    with pytest.raises(ShardError, match=r"differs in \['items', 'shard_size'"):
        embed(compose_embed(tmp_path, f"images={root / 'label1'}", f"out_dir={out}"))


def test_worker_identity():
    assert worker_identity(env={}) == (0, 1)
    assert worker_identity(env={"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0"}) == (3, 4)
    assert worker_identity(env={"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert worker_identity(2, 5, env={"RANK": "0", "WORLD_SIZE": "1"}) == (2, 5)
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE must be set together"):
        worker_identity(env={"RANK": "1"})
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        worker_identity(2, 2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        worker_identity(1, None)


def test_a_manifest_split_with_extra_columns(images, tmp_path):
    root, paths = images
    lines = ["path,label,split,shop"]
    lines += [
        f"{p.relative_to(root)},{p.parent.name},{'test' if i % 2 else 'train'},s{i}"
        for i, p in enumerate(paths)
    ]
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    embed(compose_embed(tmp_path, f"manifest={root / 'm.csv'}", "split=test", f"out_dir={out}"))
    shards = ShardSet.open(out)
    items = shards.items(0)
    assert [Path(i.uri) for i in items] == paths[1::2]
    assert items[0].extra == {"shop": "s1"} and shards.header["source"].endswith("m.csv:test")
    with pytest.raises(ValueError, match="exactly one of images=DIR or manifest="):
        embed(compose_embed(tmp_path, f"out_dir={out}"))


@pytest.mark.slow
def test_a_killed_process_resumes_without_recomputing_finished_shards(tmp_path, monkeypatch):
    root = tmp_path / "many"
    make_images(root, 40, size=96)
    out = tmp_path / "shards"
    args = [f"images={root}", f"out_dir={out}", "shard_size=2", "image_size=96", "num_workers=0"]
    args += [f"paths.log_dir={tmp_path}/logs"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen([sys.executable, str(ROOT / "embed.py"), *args], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while not shard_files(out, 0)[1].exists():
        assert child.poll() is None and time.monotonic() < deadline, "no shard was written"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = [s for s in range(21) if shard_problem(out, s, 1280) is None]
    assert finished and len(finished) < 21  # killed mid-way
    before = stats(out, finished)

    counting = Counter()
    monkeypatch.setattr(embed_task, "embed_loader", counting)
    with pytest.warns(UserWarning):
        summary, _ = embed(compose_embed(tmp_path, *args))
    assert counting.calls == 21 - len(finished) == summary["embedded"]
    assert stats(out, finished) == before
    assert ShardSet.open(out).count == 40
    assert json.loads((out / "shards.json").read_text())["num_shards"] == 21

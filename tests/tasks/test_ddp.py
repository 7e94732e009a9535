"""Distributed training on the CPU (gloo): gathering uneven validation shards, the gathered loss,
and `python train.py trainer=ddp_cpu` scoring exactly like a single-process evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available
from pytorch_metric_learning.losses import MultiSimilarityLoss, ProxyAnchorLoss, SupConLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from retrieval.training.losses import check_gatherable, compute_loss
from retrieval.training.module import gather_rows, unique_by_index

REPO = Path(__file__).resolve().parents[2]


def lightning_all_gather(tree):
    """What ``LightningModule.all_gather`` does under the DDP strategy."""
    return apply_to_collection(tree, torch.Tensor, _all_gather_ddp_if_available)


def _join(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _check_gather_rows(rank: int, counts: list[int]) -> None:
    n = counts[rank]
    local = {
        "embedding": torch.full((n, 3), float(rank)),
        "index": torch.arange(n, dtype=torch.long) + 10 * rank,
    }
    out = gather_rows(local, lightning_all_gather)
    expected = [10 * r + i for r, c in enumerate(counts) for i in range(c)]
    assert out["index"].tolist() == expected, (counts, out["index"])
    assert out["embedding"].shape == (sum(counts), 3)
    owner = [r for r, c in enumerate(counts) for _ in range(c)]
    assert out["embedding"][:, 0].tolist() == [float(r) for r in owner]


def test_padding_repeats_are_dropped_and_rows_sorted_by_dataset_index():
    arrays = {
        "index": np.array([0, 2, 4, 1, 3, 0]),  # 2 ranks of 5 items; rank 1 repeats item 0
        "label": np.array([7, 8, 9, 7, 8, 7]),
        "embedding": np.arange(12, dtype=np.float32).reshape(6, 2),
    }
    out = unique_by_index(arrays)
    assert out["index"].tolist() == [0, 1, 2, 3, 4]
    assert out["label"].tolist() == [7, 7, 8, 8, 9]
    assert out["embedding"][:, 0].tolist() == [0, 6, 2, 8, 4]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LABELS = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)  # rank 0: labels 0, 1; rank 1: 2, 3


def _check_gathered_loss(rank: int, world: int) -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen(0)), dim=1)
    part = slice(8 * rank, 8 * rank + 8)
    for loss, miner in ((MultiSimilarityLoss(), MultiSimilarityMiner()), (SupConLoss(), None)):
        full = embeddings.clone().requires_grad_()
        expected = compute_loss(loss, miner, full, LABELS)
        expected.backward()
        local = embeddings[part].clone().requires_grad_()
        value = compute_loss(loss, miner, local, LABELS[part], gather=True)
        value.backward()
        # DDP averages gradients over ranks: the world_size factor makes that the gradient
        # of the global batch's loss; each rank contributes its own embeddings' part
        assert torch.allclose(value.detach() / world, expected.detach(), atol=1e-6)
        assert full.grad is not None and local.grad is not None
        assert torch.allclose(local.grad / world, full.grad[part], atol=1e-6)
        alone = compute_loss(loss, miner, embeddings[part], LABELS[part])
        assert not torch.allclose(alone, expected, atol=1e-3)  # other ranks' negatives count


def _worker(rank: int, world: int, init_file: str) -> None:
    """One process of a 2-process gloo group (one group for all checks: starting one costs
    seconds)."""
    _join(rank, world, init_file)
    try:
        for counts in ([3, 0], [0, 2], [2, 5]):  # uneven, and a rank without rows
            _check_gather_rows(rank, counts)
        _check_gathered_loss(rank, world)
    finally:
        dist.destroy_process_group()


def test_gloo_gathers_uneven_rows_and_the_loss_of_the_global_batch(tmp_path):
    """Two real processes: validation rows gathered in rank order whatever each rank holds, and
    a gathered loss whose value and gradient are those of the global batch."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2)


def test_gathering_is_refused_for_proxy_losses_and_a_no_op_on_one_process():
    with pytest.raises(ValueError, match="ProxyAnchorLoss has trainable parameters"):
        check_gatherable(ProxyAnchorLoss(num_classes=4, embedding_size=8), None)
    with pytest.raises(ValueError, match="pytorch-metric-learning loss"):
        check_gatherable(torch.nn.MSELoss(), None)
    embeddings = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen(1)), dim=1)
    loss, miner = MultiSimilarityLoss(), MultiSimilarityMiner()
    assert compute_loss(loss, miner, embeddings, LABELS, gather=True) == compute_loss(
        loss, miner, embeddings, LABELS
    )


# 13 s on 2 quiet cores (26 s when they are busy), mostly starting and importing 2 processes
def test_two_cpu_processes_validate_exactly_like_one_evaluation_of_the_checkpoint(tmp_path):
    """``python train.py trainer=ddp_cpu``: 2 gloo processes, P x K batches split between them,
    the loss over both ranks' embeddings, validation sharded (25 images: one padding repeat, a
    partial last batch) and gathered; its metrics equal evaluate.py's on its checkpoint."""
    from retrieval.datasets.demo import prepare_demo
    from retrieval.tasks.evaluate import evaluate
    from tests.tasks.test_evaluate_task import compose_eval

    manifest = prepare_demo(tmp_path / "demo", num_labels=10, images_per_label=5, image_size=48)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "train.py",
        "trainer=ddp_cpu",
        "logger=csv",
        "data=manifest",
        f"data.manifest={manifest}",
        "data.image_size=48",
        "data.num_workers=0",
        "data.eval_batch_size=4",
        "backbone.pretrained=false",
        "model.embedder.embedding_dim=32",
        "model.gather_embeddings=true",
        "sampler.labels_per_batch=2",
        "sampler.samples_per_label=4",
        "trainer.max_epochs=1",
        f"hydra.run.dir={out}",
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr + run.stdout
    assert run.stdout.count("run directory:") == 1  # the report comes from rank 0 only
    trained = json.loads((out / "metrics.json").read_text())
    ckpt = Path(trained["best/checkpoint"])
    assert ckpt == out / "checkpoints" / "best.ckpt" and ckpt.is_file()
    # 25 training images make 3 global batches of 8: one for each of the 2 ranks
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 1
    assert len(list((out / "csv").iterdir())) == 1

    metrics, _ = evaluate(compose_eval(tmp_path / "eval", f"ckpt_path={ckpt}"))
    report = json.loads((tmp_path / "eval" / "out" / "metrics.json").read_text())
    assert report["protocol"]["data"]["images"] == 25
    for name in ("recall@1", "recall@2", "recall@4", "recall@8"):
        assert np.float32(metrics[f"test/{name}"]) == np.float32(trained[f"val/{name}"]), name
    for name in ("map@r", "r_precision"):
        assert metrics[f"test/{name}"] == pytest.approx(trained[f"val/{name}"], abs=1e-6)
    assert 0 < trained["val/recall@1"] < 1

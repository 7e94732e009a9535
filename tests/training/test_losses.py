"""Every loss config with the miner it composes with: a finite loss whose gradient reaches the
embeddings (and the loss's own parameters), through the same glue training uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from retrieval.training.losses import compute_loss
from tests.conftest import CONF, compose_train

LOSSES = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
NUM_CLASSES, DIM = 6, 32


@pytest.mark.parametrize("name", LOSSES)
def test_loss_with_its_default_miner_is_finite_and_trains(name: str, tmp_path: Path) -> None:
    sizes = [f"num_train_labels={NUM_CLASSES}", f"embedding_size={DIM}"]
    cfg = compose_train([f"loss={name}", *sizes], tmp_path)
    loss = instantiate(cfg.loss)
    miner = instantiate(cfg.miner) if cfg.get("miner") is not None else None
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(4)  # P=6 labels x K=4
    raw = torch.randn(len(labels), DIM, generator=generator, requires_grad=True)
    value = compute_loss(loss, miner, F.normalize(raw, dim=1), labels)
    assert value.ndim == 0 and torch.isfinite(value), (name, value)
    value.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all(), name
    assert raw.grad.abs().sum() > 0, f"{name}: no gradient reaches the embeddings"
    for param in loss.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name

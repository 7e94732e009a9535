"""Mixup / CutMix of instances: the shares it reports are the pixels it mixed, and the
soft-target NT-Xent is pytorch-metric-learning's NT-Xent when nothing is mixed and a naive
loop's value when something is."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import MultipleLosses, NTXentLoss, TripletMarginLoss

from retrieval.models.backbone import create_backbone
from retrieval.models.embedder import Embedder
from retrieval.training.losses import KoLeoLoss
from retrieval.training.mixing import (
    InstanceMix,
    check_mixable,
    instance_shares,
    mixed_loss,
    soft_ntxent,
)
from retrieval.training.module import RetrievalModule


def _constant_batch(rows: int, size: int = 16) -> torch.Tensor:
    """Row r is filled with the value r + 1 (every channel, every pixel)."""
    values = torch.arange(1, rows + 1, dtype=torch.float32)
    return values[:, None, None, None].expand(rows, 3, size, size).clone()


@pytest.mark.parametrize("cutmix_share", [0.0, 1.0, 0.5])
def test_shares_are_the_pixels_mixed(cutmix_share: float) -> None:
    torch.manual_seed(0)
    images = _constant_batch(12)
    mixed, shares = InstanceMix(p=1.0, alpha=1.0, cutmix_share=cutmix_share)(images)
    values = torch.arange(1, 13, dtype=torch.float32)
    assert torch.allclose(shares.sum(dim=1), torch.ones(12))
    # every output row's mean pixel is its shares' blend of the source values
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), shares @ values, atol=1e-5)
    assert (shares.diagonal() < 1).sum() >= 10  # p=1: (nearly) every row was mixed
    for row in range(12):
        sources = torch.nonzero(shares[row] > 0)[:, 0]
        assert len(sources) <= 2 and row in sources.tolist()
        if cutmix_share == 1.0:  # pasted pixels are the partner's exactly, the rest untouched
            assert set(mixed[row].unique().tolist()) <= set(values[sources].tolist())
    assert torch.equal(images, _constant_batch(12))  # the input is not changed


def test_only_edited_views_are_mixed() -> None:
    torch.manual_seed(1)
    images = _constant_batch(8)
    views = torch.tensor([0, 1] * 4)
    mixed, shares = InstanceMix(p=1.0)(images, views)
    anchors = views == 0
    assert torch.equal(mixed[anchors], images[anchors])
    assert torch.equal(shares[anchors], torch.eye(8)[anchors])
    partners = torch.nonzero(shares[~anchors] > 0)[:, 1]
    assert bool((views[partners] == 1).all())  # edited views mix with edited views only


def test_p_zero_mixes_nothing() -> None:
    images = _constant_batch(6)
    mixed, shares = InstanceMix(p=0.0)(images)
    assert torch.equal(mixed, images) and torch.equal(shares, torch.eye(6))


def test_instance_shares_add_views_of_one_instance() -> None:
    shares = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.4, 0.0, 0.6]])
    labels = torch.tensor([5, 5, 2])  # rows 0 and 1 are views of one instance
    expected = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.4]])  # columns: label 2, label 5
    assert torch.allclose(instance_shares(shares, labels), expected)


def test_soft_ntxent_equals_pml_ntxent_without_mixing() -> None:
    torch.manual_seed(2)
    embeddings = F.normalize(torch.randn(16, 8), dim=1)
    labels = torch.arange(8).repeat_interleave(2)
    for temperature in (0.05, 0.1, 0.5):
        ours = soft_ntxent(embeddings, labels, torch.eye(16), temperature)
        theirs = NTXentLoss(temperature=temperature)(embeddings, labels)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_soft_ntxent_against_a_naive_loop() -> None:
    torch.manual_seed(3)
    embeddings = F.normalize(torch.randn(8, 6), dim=1)
    labels = torch.arange(4).repeat_interleave(2)
    torch.manual_seed(4)
    _, shares = InstanceMix(p=1.0)(_constant_batch(8), torch.tensor([0, 1] * 4))
    mix = [
        [sum(shares[i, r].item() for r in range(8) if labels[r] == u) for u in range(4)]
        for i in range(8)
    ]
    total, rows = 0.0, 0
    for i in range(8):
        overlap = [
            sum(a * b for a, b in zip(mix[i], mix[j], strict=True)) if j != i else 0.0
            for j in range(8)
        ]
        logits = [(embeddings[i] @ embeddings[j]).item() / 0.1 for j in range(8)]
        norm = math.log(sum(math.exp(logits[j]) for j in range(8) if j != i))
        weight = sum(overlap)
        if weight > 0:
            total += -sum(overlap[j] / weight * (logits[j] - norm) for j in range(8) if j != i)
            rows += 1
    assert soft_ntxent(embeddings, labels, shares, 0.1).item() == pytest.approx(
        total / rows, rel=1e-5
    )


def test_mixing_trains_only_with_ntxent() -> None:
    tiny_embedder = Embedder(create_backbone("test_efficientnet", pretrained=False), 16, "avg")
    optimizer = torch.optim.AdamW
    with pytest.raises(ValueError, match="needs loss=ntxent"):
        RetrievalModule(tiny_embedder, TripletMarginLoss(), optimizer, mix=InstanceMix())
    module = RetrievalModule(tiny_embedder, NTXentLoss(), optimizer, mix=InstanceMix(p=1.0))
    batch = {
        "image": torch.rand(8, 3, 32, 32),
        "label": torch.arange(4).repeat_interleave(2),
        "view": torch.tensor([0, 1] * 4),
    }
    module.log = lambda *args, **kwargs: None  # no trainer attached
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("bad", [{"p": 1.5}, {"alpha": 0.0}, {"cutmix_share": -0.1}])
def test_bad_settings_are_named(bad: dict) -> None:
    with pytest.raises(ValueError, match="model.mix"):
        InstanceMix(**bad)


def test_a_mixed_batch_trains_with_koleo_beside_the_soft_ntxent() -> None:
    """``loss=ntxent_koleo`` with mixing: the soft NT-Xent plus KoLeo on the same embeddings,
    each times its weight, equal to the two computed apart."""
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(8, 16), dim=1)
    labels = torch.arange(4).repeat_interleave(2)
    shares = torch.eye(8)
    shares[3] = 0.0
    shares[3, 3], shares[3, 5] = 0.6, 0.4  # row 3 is partly a copy of row 5
    both = MultipleLosses([NTXentLoss(temperature=0.05), KoLeoLoss()], weights=[1.0, 30.0])
    apart = soft_ntxent(embeddings, labels, shares, 0.05) + 30.0 * KoLeoLoss()(embeddings, labels)
    assert mixed_loss(both, embeddings, labels, shares).item() == pytest.approx(apart.item())
    with pytest.raises(ValueError, match="needs loss=ntxent"):
        check_mixable(MultipleLosses([TripletMarginLoss(), KoLeoLoss()]))

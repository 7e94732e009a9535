"""The KoLeo entropy term against a naive loop, and SSCD's objective as a loss config."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_metric_learning.losses import MultipleLosses, NTXentLoss

from retrieval.training.losses import KoLeoLoss, nearest_other_label
from tests.conftest import CONF


def _naive(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    terms = []
    for i in range(len(embeddings)):
        gaps = [
            float((embeddings[i] - embeddings[j]).norm())
            for j in range(len(embeddings))
            if labels[j] != labels[i]
        ]
        if gaps:
            terms.append(-math.log(min(gaps) + 1e-8))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", range(3))
def test_koleo_matches_a_naive_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 6, generator=generator), dim=1)
    labels = torch.arange(6).repeat_interleave(2)  # two views of six images
    got = float(KoLeoLoss()(embeddings, labels))
    assert got == pytest.approx(_naive(embeddings, labels), rel=1e-5)


def test_the_views_of_one_image_are_not_its_neighbours() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 2])  # rows 0 and 1: two views of one image
    # row 3 is as close to rows 0 and 1 (0.6) as row 2 is to it (0.8): 2 wins; ties go low
    assert nearest_other_label(embeddings, labels).tolist() == [3, 3, 3, 2]
    assert nearest_other_label(embeddings, torch.zeros(4, dtype=torch.long)).tolist() == [-1] * 4


def test_koleo_pushes_different_images_apart() -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    labels = torch.arange(16)
    loss = KoLeoLoss()(embeddings, labels)
    loss.backward()
    with torch.no_grad():
        stepped = torch.nn.functional.normalize(embeddings - 0.01 * embeddings.grad, dim=1)
    assert float(KoLeoLoss()(stepped, labels)) < float(loss.detach())


def test_ntxent_koleo_config_builds_sscds_objective() -> None:
    loss = instantiate(OmegaConf.load(CONF / "loss" / "ntxent_koleo.yaml"))
    assert isinstance(loss, MultipleLosses)
    ntxent, koleo = loss.losses
    assert isinstance(ntxent, NTXentLoss) and ntxent.temperature == pytest.approx(0.05)
    assert isinstance(koleo, KoLeoLoss) and loss.weights == [1.0, 30.0]
    embeddings = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    labels = torch.arange(4).repeat_interleave(2)
    expected = float(ntxent(embeddings, labels)) + 30.0 * float(koleo(embeddings, labels))
    assert float(loss(embeddings, labels)) == pytest.approx(expected, rel=1e-5)

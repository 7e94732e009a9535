"""frozen_stages: the stem and the first stages take no gradient and run no backward pass;
the rest trains; bad values are named."""

from __future__ import annotations

import pytest
import torch

from retrieval.models import Embedder, create_backbone
from retrieval.models.embedder import frozen_stage_names


def _lite0() -> Embedder:
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    return Embedder(backbone, 16, "gem", frozen_stages=5)


def test_the_stem_and_first_stages_are_frozen_and_the_rest_trains() -> None:
    embedder = _lite0()
    net = embedder.backbone.net
    frozen = [net.conv_stem, net.bn1, *net.blocks[:5]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    trainable = [*net.blocks[5:], net.conv_head]
    convs = [p for m in trainable for n, p in m.named_parameters() if "conv" in n]
    assert convs and all(p.requires_grad for p in convs)
    embedder.train()
    norms_in_frozen = [
        m for m in frozen for m in m.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert norms_in_frozen and not any(m.training for m in norms_in_frozen)
    loss = embedder(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in convs)


def test_no_activations_are_kept_for_the_frozen_stages() -> None:
    """The frozen part's outputs need no gradient, so autograd records nothing before the first
    trainable stage: the graph starts there."""
    embedder = _lite0()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hook = embedder.backbone.net.blocks[4].register_forward_hook(
        lambda module, inputs, output: seen.append(output.requires_grad)
    )
    embedder(x)
    hook.remove()
    assert seen == [False]


def test_bad_values_and_backbones_are_named() -> None:
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    assert frozen_stage_names(backbone, 0) == set()
    with pytest.raises(ValueError, match="at most 6"):
        frozen_stage_names(backbone, 7)
    with pytest.raises(ValueError, match="integer >= 0"):
        frozen_stage_names(backbone, -1)
    torchvision = create_backbone("resnet18", pretrained=False, source="torchvision")
    with pytest.raises(ValueError, match="needs a timm backbone"):
        Embedder(torchvision, 8, "avg", frozen_stages=1)

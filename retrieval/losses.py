"""Glue around pytorch-metric-learning losses and miners; no loss math of our own.

Losses are configured as partial constructors (``_partial_: true``) because some of their
arguments are known only once the data is read: classification-style losses (ProxyAnchor,
ProxyNCA, NormalizedSoftmax, ArcFace, CosFace) need ``num_classes`` and ``embedding_size``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def build_loss(
    factory: Callable[..., nn.Module] | nn.Module, num_classes: int, embedding_size: int
) -> nn.Module:
    """Call ``factory`` with whichever of ``num_classes`` / ``embedding_size`` it accepts."""
    if isinstance(factory, nn.Module):
        return factory
    target = getattr(factory, "func", factory)
    accepted = inspect.signature(target).parameters
    given = {"num_classes": num_classes, "embedding_size": embedding_size}
    return factory(**{k: v for k, v in given.items() if k in accepted})


def compute_loss(
    loss: nn.Module, miner: nn.Module | None, embeddings: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Loss of ``embeddings`` (B, D) with integer ``labels`` (B,), mined pairs or triplets if a
    miner is given. Computed in float32 with autocast off: margin and proxy losses overflow or
    turn NaN in float16."""
    device_type = embeddings.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        embeddings = embeddings.float()
        indices: Any = miner(embeddings, labels) if miner is not None else None
        return loss(embeddings, labels, indices)

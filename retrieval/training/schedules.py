"""Learning rates: schedules as pure functions of the optimizer step, and layer-wise
learning-rate decay for vision transformers: parameters near the input learn slower than those
near the output, so fine-tuning keeps the pretrained low-level features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, min_factor: float
) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then cosine
    decay to ``min_factor`` at ``total_steps``; stays at ``min_factor`` afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_factor: float = 0.01,
) -> LambdaLR:
    """Cosine schedule with linear warm-up over ``warmup_fraction`` of ``total_steps``; stepped
    after every optimizer step."""
    warmup = int(round(warmup_fraction * total_steps))
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, total_steps, warmup, min_factor))


# parameters before the first block: the patch embedding, class / register / mask tokens,
# position embeddings and CLIP's pre-norm
_STEM = ("patch_embed.", "cls_token", "reg_token", "mask_token", "pos_embed", "norm_pre.")


def is_vit(net: nn.Module) -> bool:
    """Whether ``net`` is a timm vision transformer (a ``blocks`` list after a ``patch_embed``)."""
    return isinstance(getattr(net, "blocks", None), nn.Sequential | nn.ModuleList) and hasattr(
        net, "patch_embed"
    )


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of parameter ``name`` of a timm ViT with ``num_blocks`` blocks: 0 for the stem
    (patch embedding, tokens, position embeddings), ``i + 1`` for ``blocks.i``, and
    ``num_blocks + 1`` for what follows the blocks (the final norm, a pooling head)."""
    if name.startswith(_STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layer_decay_groups(
    net: nn.Module, base_lr: float, decay: float, prefix: str = "backbone"
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters of timm ViT ``net``, one per depth.

    Layer ``l`` (see :func:`layer_id`, L = number of blocks) gets learning rate
    ``base_lr * decay ** (L + 1 - l)``: the final norm trains at ``base_lr``, the patch
    embedding at ``base_lr * decay ** (L + 1)``. Groups are named ``{prefix}.layer{l}``,
    shallowest first; depths without trainable parameters get no group.

    Raises:
        ValueError: ``net`` is not a timm ViT, or ``decay`` is not in (0, 1].
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"model.layer_decay must be in (0, 1], got {decay}")
    if not is_vit(net):
        raise ValueError(
            f"model.layer_decay={decay} needs a vision transformer backbone (timm, with "
            f"blocks after a patch_embed); {type(net).__name__} is not one: set "
            "model.layer_decay=null"
        )
    num_blocks = len(net.blocks)  # type: ignore[arg-type]
    by_layer: dict[int, list[nn.Parameter]] = {}
    for name, param in net.named_parameters():
        if param.requires_grad:
            by_layer.setdefault(layer_id(name, num_blocks), []).append(param)
    return [
        {
            "params": by_layer[layer],
            "lr": base_lr * decay ** (num_blocks + 1 - layer),
            "name": f"{prefix}.layer{layer}",
        }
        for layer in sorted(by_layer)
    ]

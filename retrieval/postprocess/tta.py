"""Test-time augmentation: embed an image at several scales (and mirrored), average.

The views are made from the preprocessed batch ``(B, 3, S, S)`` itself (bilinear resizing of
the normalised pixels, ``align_corners=False``, and a horizontal flip), so the same views come
out of every runtime: the augmentation is part of the exported model graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["tta_embed", "tta_sizes"]


def tta_sizes(side: int, scales: Sequence[float], multiple: int = 1) -> list[int]:
    """The square side of each view: ``side * scale`` rounded to a multiple of ``multiple``
    (a ViT's patch size), at least ``multiple``."""
    m = max(1, int(multiple))
    return [max(m, int(round(side * float(s) / m)) * m) for s in scales]


def tta_embed(
    embed: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    multiple: int = 1,
) -> torch.Tensor:
    """``normalize(sum of embed(view))`` over the views of ``images`` (B, 3, S, S).

    ``embed`` maps a batch of any square size to unit rows; a scale of 1 uses the images as
    they are, others resize them to :func:`tta_sizes`; ``flip`` adds each view mirrored.
    """
    side = int(images.shape[-1])
    total: torch.Tensor | None = None
    for size in tta_sizes(side, scales, multiple):
        view = images
        if size != side:
            view = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        for v in (view, view.flip(-1)) if flip else (view,):
            out = embed(v).float()
            total = out if total is None else total + out
    assert total is not None
    return F.normalize(total, p=2.0, dim=-1)

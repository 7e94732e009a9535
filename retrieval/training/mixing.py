"""Mixup and CutMix of instances for copy-detection training (as SSCD, Pizzi et al. 2022): a
training view is blended with, or has a patch pasted from, another image of the batch, and the
contrastive loss treats it as a partial copy of both.

:class:`InstanceMix` mixes a batch of views and returns, with the mixed pixels, the share of
every source row in every output row. :func:`soft_ntxent` is NT-Xent with those shares as
soft targets: the target of row ``i`` on row ``j`` is how much picture the two have in
common, ``sum_u m_i(u) m_j(u)`` over the instances ``u``, ``m_i`` being row ``i``'s mix of
instances; the targets of a row sum to one over the other rows. With nothing mixed and two
views per instance this is exactly pytorch-metric-learning's ``NTXentLoss`` (one positive per
row, every other row a negative); ``tests/training/test_mixing.py`` checks both against it.
:func:`mixed_loss` trains a mixed batch with NT-Xent alone or with other terms beside it
(SSCD's KoLeo, ``loss=ntxent_koleo``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import MultipleLosses, NTXentLoss
from torch import nn

__all__ = ["InstanceMix", "check_mixable", "instance_shares", "mixed_loss", "soft_ntxent"]


class InstanceMix:
    """Mix some views of a batch with other views of the same batch.

    Each mixable row is, with probability ``p``, either blended with its partner
    (mixup, ``lam * own + (1 - lam) * partner``) or has a box of its partner pasted in
    (CutMix, the box covering ``1 - lam`` of the area), CutMix in ``cutmix_share`` of the
    mixed rows. ``lam`` is drawn from Beta(``alpha``, ``alpha``) and, for CutMix, recomputed from
    the box actually pasted (boxes are clipped at the border). The partners are the mixable
    rows in a random cyclic order, each row mixed with the next one's unmixed pixels. Where the
    batch numbers its views (``data.anchor_view=true``: view 0 plain, the others edited) only
    the edited views are mixed: a copy is searched among unmixed originals. Randomness comes
    from torch's global generator (seeded by Lightning).
    """

    def __init__(self, p: float = 0.5, alpha: float = 1.0, cutmix_share: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0 or not 0.0 <= cutmix_share <= 1.0:
            raise ValueError(f"model.mix: p={p} and cutmix_share={cutmix_share} must lie in [0, 1]")
        if not alpha > 0:
            raise ValueError(f"model.mix: alpha={alpha} must be > 0 (Beta(alpha, alpha))")
        self.p, self.alpha, self.cutmix_share = float(p), float(alpha), float(cutmix_share)

    def __call__(
        self, images: torch.Tensor, views: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed images, shares)`` for ``images`` (B, C, H, W): ``shares[i, r]`` is the
        fraction of output row ``i``'s pixels taken from input row ``r`` (rows sum to one; the
        identity where nothing was mixed). ``views`` (B,): the view number of each row, rows
        with view 0 left unmixed; ``None``: every row may be mixed."""
        batch = images.shape[0]
        shares = torch.eye(batch, dtype=torch.float32)
        mixable = torch.arange(batch) if views is None else torch.nonzero(views.cpu() > 0)[:, 0]
        if len(mixable) < 2 or self.p == 0.0:
            return images, shares
        order = mixable[torch.randperm(len(mixable))]
        partners = dict(zip(order.tolist(), order.roll(-1).tolist(), strict=True))
        mixed = images.clone()
        uniform = torch.rand(len(order), 2).tolist()
        beta = torch.distributions.Beta(self.alpha, self.alpha)
        for row, (draw, kind) in zip(order.tolist(), uniform, strict=True):
            if draw >= self.p:
                continue
            partner = partners[row]
            lam = float(beta.sample())
            if kind < self.cutmix_share:
                lam = _paste_box(mixed[row], images[partner], lam)
            else:
                mixed[row] = lam * images[row] + (1.0 - lam) * images[partner]
            shares[row, row], shares[row, partner] = lam, 1.0 - lam
        return mixed, shares.to(images.device)


def _paste_box(target: torch.Tensor, source: torch.Tensor, lam: float) -> float:
    """Paste into ``target`` (C, H, W), in place, the box of ``source`` covering about
    ``1 - lam`` of the area (same aspect as the image, centred at a uniform random point,
    clipped at the border); return the share of ``target`` left as it was."""
    height, width = target.shape[-2:]
    side = math.sqrt(1.0 - lam)
    box_h, box_w = round(height * side), round(width * side)
    cy, cx = (torch.rand(2) * torch.tensor([height, width])).tolist()
    top, bottom = max(0, round(cy - box_h / 2)), min(height, round(cy + box_h / 2))
    left, right = max(0, round(cx - box_w / 2)), min(width, round(cx + box_w / 2))
    target[:, top:bottom, left:right] = source[:, top:bottom, left:right]
    return 1.0 - (bottom - top) * (right - left) / (height * width)


def instance_shares(shares: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, U)``: each row's mix of the batch's instances (``U`` distinct labels, sorted), from
    the row-to-row ``shares`` of :class:`InstanceMix` and the rows' ``labels``."""
    _, inverse = torch.unique(labels, return_inverse=True)
    one_hot = F.one_hot(inverse, num_classes=int(inverse.max()) + 1).to(shares)
    return shares @ one_hot


def soft_ntxent(
    embeddings: torch.Tensor, labels: torch.Tensor, shares: torch.Tensor, temperature: float
) -> torch.Tensor:
    """NT-Xent over ``embeddings`` (B, D, L2-normalised) with soft targets: row ``i``'s target
    on row ``j != i`` is proportional to the picture they share, ``m_i . m_j`` with ``m`` from
    :func:`instance_shares`. The mean over rows that share anything with another row; float32
    with autocast off."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        emb = embeddings.float()
        mix = instance_shares(shares.float(), labels)
        overlap = mix @ mix.T
        eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
        overlap = overlap.masked_fill(eye, 0.0)
        total = overlap.sum(dim=1)
        rows = total > 0
        log_p = F.log_softmax((emb @ emb.T / temperature).masked_fill(eye, float("-inf")), dim=1)
        targets = overlap[rows] / total[rows, None]
        return -(targets * log_p[rows].masked_fill(eye[rows], 0.0)).sum(dim=1).mean()


def _terms(loss: nn.Module) -> list[tuple[nn.Module, float]]:
    """``(term, weight)`` of a loss: itself, or the terms of a ``MultipleLosses``."""
    if isinstance(loss, MultipleLosses):
        keys = loss.losses.keys() if loss.is_dict else range(len(loss.losses))
        return [(loss.losses[k], float(loss.weights[k])) for k in keys]
    return [(loss, 1.0)]


def check_mixable(loss: nn.Module) -> None:
    """Raise ``ValueError`` unless a mixed batch can train with ``loss``: one
    ``NTXentLoss``, alone or in a ``MultipleLosses`` (whose other terms, such as KoLeo, see
    the embeddings and labels as they are); its soft-target form is :func:`soft_ntxent`."""
    ntxent = [term for term, _ in _terms(loss) if isinstance(term, NTXentLoss)]
    if len(ntxent) != 1:
        raise ValueError(
            "model.mix trains with a soft-target NT-Xent and needs loss=ntxent (or "
            f"loss=ntxent_koleo), got {type(loss).__name__}; set model.mix=null or loss=ntxent"
        )


def mixed_loss(
    loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, shares: torch.Tensor
) -> torch.Tensor:
    """``loss`` of a mixed batch: its NT-Xent as :func:`soft_ntxent` with the ``shares`` of
    :class:`InstanceMix`, any other term of a ``MultipleLosses`` (e.g. KoLeo) on the
    embeddings and labels, each times its weight."""
    total = embeddings.new_zeros(())
    for term, weight in _terms(loss):
        if isinstance(term, NTXentLoss):
            part = soft_ntxent(embeddings, labels, shares, term.temperature)
        else:
            part = term(embeddings, labels)
        total = total + weight * part
    return total

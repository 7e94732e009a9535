"""Glue around pytorch-metric-learning losses and miners, and one loss of our own (KoLeo).

Classification-style losses (ProxyAnchor, ProxyNCA, NormalizedSoftmax, ArcFace, CosFace) need
``num_classes`` and ``embedding_size``, known only once the data is read and the model built:
their configs take them by interpolation from ``num_train_labels`` / ``embedding_size``, which
``train.py`` measures (``conf/train.yaml``).

Under distributed training a pair-based loss sees only its rank's batch unless embeddings are
gathered (``gather=True``): then PML's ``DistributedLossWrapper`` / ``DistributedMinerWrapper``
compute the loss over the global batch (every rank's embeddings and labels), with gradients
flowing through the local part.

One loss of our own, :class:`KoLeoLoss`: the KoLeo entropy term of SSCD (Pizzi et al., CVPR
2022): spread the embeddings of different images apart, so that a similarity means the same for
every query (what µAP rewards).

Sablayrolles et al.'s Kozachenko-Leonenko estimator of differential entropy is, up to constants,
``-mean_i log(min_j ||x_i - x_j||)``; minimising it pushes every embedding away from its nearest
neighbour. Here the neighbour is the nearest embedding of *another label*: the other views of
one image are InfoNCE's positives and must stay close. SSCD adds the term to InfoNCE with weight
30; ``conf/loss/ntxent_koleo.yaml`` combines the two with pytorch-metric-learning's
``MultipleLosses``.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
)
from torch import nn

__all__ = ["KoLeoLoss", "nearest_other_label"]


def check_gatherable(loss: nn.Module, miner: nn.Module | None) -> None:
    """Raise ``ValueError`` unless ``loss`` and ``miner`` can be computed over gathered embeddings.

    Only parameter-free PML losses qualify. Losses with parameters (proxies, class weights) compare
    each embedding with the parameters, not with other ranks' embeddings, so gathering brings them
    nothing; and since the wrapper scales the loss by the world size (see :func:`compute_loss`),
    their parameters' gradients would come out world_size times too large.
    """
    fix = "set model.gather_embeddings=false"
    if not isinstance(loss, BaseMetricLossFunction):
        raise ValueError(
            f"model.gather_embeddings needs a pytorch-metric-learning loss, got "
            f"{type(loss).__name__}; {fix}"
        )
    if any(p.requires_grad for p in loss.parameters()):
        raise ValueError(
            f"model.gather_embeddings: {type(loss).__name__} has trainable parameters (proxies or "
            "class weights); it compares embeddings with them, not with other ranks' embeddings, "
            f"and gathering would scale their gradients by the world size; {fix}"
        )
    if miner is not None and not isinstance(miner, BaseMiner):
        raise ValueError(
            f"model.gather_embeddings needs a pytorch-metric-learning miner, got "
            f"{type(miner).__name__}; {fix}"
        )


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group; 1 when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def compute_loss(
    loss: nn.Module,
    miner: nn.Module | None,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    gather: bool = False,
) -> torch.Tensor:
    """Loss of ``embeddings`` (B, D) with integer ``labels`` (B,), mined pairs or triplets if a
    miner is given. Computed in float32 with autocast off: margin and proxy losses overflow or
    turn NaN in float16.

    With ``gather`` and W > 1 processes, every rank must call this with the same B. The miner and
    the loss then run over the W x B embeddings of all ranks (this rank's first, the others'
    without gradient), and the value returned is W x that global-batch loss: DDP averages
    gradients over ranks, so the parameters receive the global-batch loss's gradient (each rank
    contributes the part that flows through its own embeddings). Divide by W to report the loss.
    With one process ``gather`` changes nothing."""
    device_type = embeddings.device.type
    if gather and world_size() > 1:
        check_gatherable(loss, miner)
        loss = DistributedLossWrapper(loss, efficient=False)
        miner = DistributedMinerWrapper(miner, efficient=False) if miner is not None else None
    with torch.autocast(device_type=device_type, enabled=False):
        embeddings = embeddings.float()
        indices: Any = miner(embeddings, labels) if miner is not None else None
        return loss(embeddings, labels, indices)


def nearest_other_label(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar row (inner product) among rows of another label,
    ``(N,)`` int64, the lowest index on ties; -1 for a row with no such row."""
    with torch.no_grad():
        sims = embeddings @ embeddings.T
        sims = sims.masked_fill(labels[:, None] == labels[None, :], float("-inf"))
        best = sims.max(dim=1)
        # argmax of the first maximum: equal similarities resolve to the lowest index
        first = (sims == best.values[:, None]).int().argmax(dim=1)
        return torch.where(torch.isinf(best.values), torch.full_like(first, -1), first)


class KoLeoLoss(BaseMetricLossFunction):
    """pytorch-metric-learning loss: per embedding ``-log(||x_i - x_n(i)|| + eps)`` with
    ``n(i)`` from :func:`nearest_other_label`, averaged by the reducer over rows that have a
    neighbour (a batch of one label gives 0). Embeddings are expected L2-normalised, so the
    gap is at most 2 and the term at least ``-log 2``.
    """

    def __init__(self, eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_to_recordable_attributes(list_of_names=["eps"], is_stat=False)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices_tuple: Any,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> dict[str, Any]:
        neighbour = nearest_other_label(embeddings, labels)
        rows = torch.nonzero(neighbour >= 0).flatten()
        gaps = (embeddings[rows] - embeddings[neighbour[rows]]).norm(dim=1)
        return {
            "loss": {
                "losses": -torch.log(gaps + self.eps),
                "indices": rows,
                "reduction_type": "element",
            }
        }

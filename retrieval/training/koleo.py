"""The KoLeo entropy term of SSCD (Pizzi et al., CVPR 2022): spread the embeddings of different
images apart, so that a similarity means the same for every query (what µAP rewards).

Sablayrolles et al.'s Kozachenko-Leonenko estimator of differential entropy is, up to
constants, ``-mean_i log(min_j ||x_i - x_j||)``; minimising it pushes every embedding away from
its nearest neighbour. Here the neighbour is the nearest embedding of *another label*: the
other views of one image are InfoNCE's positives and must stay close. SSCD adds the term to
InfoNCE with weight 30; ``conf/loss/ntxent_koleo.yaml`` combines the two with
pytorch-metric-learning's ``MultipleLosses``.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction

__all__ = ["KoLeoLoss", "nearest_other_label"]


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

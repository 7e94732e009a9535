"""The Embedder: backbone -> pooling -> head -> L2 normalisation.

Every embedding the project produces (training, validation, evaluation, export, search) comes from
this module: float32 rows of unit L2 norm, compared by inner product (= cosine similarity).
"""

from __future__ import annotations

import torch
from torch import nn

from retrieval.models.backbone import Backbone, Preprocessing
from retrieval.models.pooling import TokenPool, build_pooling, l2_normalize


class Embedder(nn.Module):
    """Images ``(B, 3, H, W)`` -> embeddings ``(B, embedding_dim)``, L2-normalised float32.

    Args:
        backbone: feature extractor (see :func:`retrieval.models.create_backbone`).
        embedding_dim: output size of the linear head; ``None`` keeps the backbone's features
            (no head).
        pooling: ``avg`` | ``gem`` | ``max`` | ``avgmax``; transformers also take ``token``.
        head_bn: BatchNorm1d after the linear head.
        freeze_bn: keep every BatchNorm of the backbone in eval mode with frozen affine
            parameters while training (small batches, fine-grained data).
        channels_last: run the backbone in channels-last memory format (faster convolutions).
    """

    def __init__(
        self,
        backbone: Backbone,
        embedding_dim: int | None = 512,
        pooling: str = "gem",
        head_bn: bool = False,
        freeze_bn: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        tokens = backbone.num_prefix_tokens > 0 or pooling == "token"
        self.pool = (
            TokenPool(pooling, backbone.num_prefix_tokens) if tokens else build_pooling(pooling)
        )
        features = backbone.num_features
        layers: list[nn.Module] = []
        if embedding_dim is not None:
            layers.append(nn.Linear(features, embedding_dim))
            if head_bn:
                layers.append(nn.BatchNorm1d(embedding_dim))
        elif head_bn:
            layers.append(nn.BatchNorm1d(features))
        self.head = nn.Sequential(*layers)
        self.embedding_dim = embedding_dim or features
        self.freeze_bn = freeze_bn
        self.channels_last = channels_last
        if freeze_bn:
            for module in self._backbone_norms():
                module.requires_grad_(False)
                # now, not only in train(): Lightning does not call train() at fit start, so
                # norms left in train mode would re-estimate their statistics all along
                module.eval()
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing

    def _backbone_norms(self) -> list[nn.Module]:
        norms = nn.modules.batchnorm._BatchNorm
        return [m for m in self.backbone.modules() if isinstance(m, norms)]

    def train(self, mode: bool = True) -> Embedder:
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self._backbone_norms():
                module.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters after the backbone (pooling and head), trained from the first step."""
        return [p for p in [*self.pool.parameters(), *self.head.parameters()] if p.requires_grad]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor, backbone_grad: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embedding_dim) unit rows. ``backbone_grad=False`` runs the
        backbone without autograd (a frozen backbone costs no backward pass)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            features = self.backbone(images)
        return l2_normalize(self.head(self.pool(features)))

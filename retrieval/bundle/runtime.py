"""Run a bundle's exported model: ONNX Runtime, OpenVINO (the same ONNX file), TorchScript or
the rebuilt PyTorch module, all behind one :class:`Runtime` that returns L2-normalised float32
rows."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.bundle.format import BundleError
from retrieval.bundle.model_config import (
    MODEL_CONFIG,
    RUNTIME_FILES,
    build_embedder,
    quiet_tracing,
    read_model_config,
)
from retrieval.infra.checks import positive_int
from retrieval.infra.hardware import usable_cores
from retrieval.models.extract import resolve_device


def onnxruntime_module() -> Any:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def onnx_session(path: Path, providers: list[str], threads: int | None) -> Any:
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise _unreadable(path, "loaded by onnxruntime", err, str(err)) from None
    _check_names(
        path, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    )
    return session


def _unreadable(path: Path, by: str, err: Exception, detail: str) -> BundleError:
    return BundleError(
        f"{path} cannot be {by} ({type(err).__name__}: {detail}); the file is corrupt or "
        "truncated: re-export the bundle"
    )


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""


def _check_names(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """The exported graph maps ``images`` to ``embeddings``, as export writes it."""
    if inputs != ["images"] or outputs != ["embeddings"]:
        raise BundleError(f"{path} maps {inputs} -> {outputs}, not ['images'] -> ['embeddings']")


class Runtime:
    """Runs a bundle's model: ``embed((B, 3, S, S) float32) -> (B, D)`` unit float32 rows.

    Attributes: ``kind`` (``onnx`` | ``openvino`` | ``torchscript`` | ``eager``), ``device``
    (``cpu`` | ``cuda``), ``embedding_dim`` (D) and ``input_size`` (S). Built by
    :func:`load_runtime`.
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
        self.any_size = bool(config.get("any_size", False))
        self._run = run

    def __repr__(self) -> str:
        return (
            f"Runtime(kind={self.kind!r}, device={self.device!r}, "
            f"input_size={self.input_size}, embedding_dim={self.embedding_dim})"
        )

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, H, W)`` float32 (see :class:`~retrieval.data.preprocessing.Preprocessing`)
        -> ``(B, D)`` float32 rows of unit L2 norm; ``B`` may be 0. ``H`` and ``W`` are the
        model's ``S`` x ``S`` input, except for a model exported for any size
        (``resize_mode=short`` or ``long``), one of whose sides is ``S``.

        Raises TypeError for a non-array or non-float32 batch, ValueError for a wrong shape.
        """
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"embed takes a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise TypeError(
                f"embed takes float32 images, got {batch.dtype}: use .astype(np.float32)"
            )
        self._check_shape(batch.shape)
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

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        side = self.input_size
        if self.any_size:  # resize_mode short (the short side S) or long (the long side S)
            fits = len(shape) == 4 and shape[1] == 3 and side in shape[2:]
            want = f"(B, 3, H, W) with H or W = {side}"
        else:
            fits = len(shape) == 4 and shape[1:] == (3, side, side)
            want = f"(B, 3, {side}, {side})"
        if not fits:
            raise ValueError(
                f"embed takes images of shape {want}, got {shape}; prepare them with the "
                "bundle's Preprocessing"
            )

    def embed_many(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``len(images)`` prepared images, each ``(3, H, W)`` -> ``(len(images), D)`` rows in
        that order: images of one shape are embedded in one call, as :meth:`embed`
        (``resize_mode=short`` and ``long`` give images of several shapes)."""
        out = np.zeros((len(images), self.embedding_dim), dtype=np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            groups.setdefault(tuple(np.shape(image)), []).append(position)
        for members in groups.values():
            out[members] = self.embed(np.stack([images[i] for i in members]))
        return out


class RuntimeModule(nn.Module):
    """A :class:`Runtime` behind a torch module's call, for code that embeds through one
    (:func:`retrieval.models.extract.embed_loader`): ``(B, 3, S, S)`` tensor -> ``(B, D)``
    float32 tensor on the CPU.

    ``load`` makes the runtime on the first call, so a caller whose embeddings all come from
    a cache never exports or loads anything. ``source``, the PyTorch model the runtime is
    exported from, is kept as a submodule so that a fingerprint of the weights still tells
    models apart; it is never run."""

    def __init__(self, load: Callable[[], Runtime], source: nn.Module, embedding_dim: int) -> None:
        super().__init__()
        self._load = load
        self._runtime: Runtime | None = None
        self.source = source
        self.embedding_dim = embedding_dim

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = self._load()
        return self._runtime

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(self.runtime.embed(batch))


def torch_runner(module: nn.Module, device: str) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return run


def load_runtime(
    folder: str | Path, kind: str = "auto", threads: int | None = None, device: str = "auto"
) -> Runtime:
    """Load the model of bundle ``folder`` to embed images.

    ``kind``: ``onnx`` (onnxruntime; CUDA provider when installed and allowed), ``openvino``
    (OpenVINO on the CPU, float32 inference, from the same ONNX file; the ``openvino`` extra),
    ``torchscript``
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
    if threads is not None:
        positive_int(threads, "threads (or None)")
    if kind == "auto":
        kind = "onnx" if onnxruntime_module() is not None else "torchscript"
    config = read_model_config(root / MODEL_CONFIG)
    path = root / RUNTIME_FILES[kind]
    if not path.is_file():
        raise BundleError(f"{path} does not exist: re-export the bundle or choose another kind")
    if kind == "onnx":
        return _onnx_runtime(path, config, threads, device)
    if kind == "openvino":
        return _openvino_runtime(path, config, threads, device)
    if threads is not None:
        torch.set_num_threads(threads)
    target = str(resolve_device(device))
    if kind == "eager":
        model: nn.Module = build_embedder(config, path).to(target)
    else:
        try:
            with quiet_tracing():
                model = torch.jit.load(str(path), map_location=target).eval()
        except Exception as err:  # torch raises RuntimeError and others for bad archives
            raise _unreadable(path, "loaded by torch.jit.load", err, _first_line(err)) from None
    return Runtime(kind, target, config, torch_runner(model, target))


def _onnx_runtime(path: Path, config: dict[str, Any], threads: int | None, device: str) -> Runtime:
    ort = onnxruntime_module()
    if ort is None:
        raise ValueError("kind='onnx' needs onnxruntime: pip install onnxruntime")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise ValueError("device='cuda' needs onnxruntime-gpu (no CUDAExecutionProvider here)")
    providers = ["CPUExecutionProvider"]
    if cuda and device != "cpu":
        providers.insert(0, "CUDAExecutionProvider")
    session = onnx_session(path, providers, threads)
    used = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"images": batch})[0]

    return Runtime("onnx", used, config, run)


def _openvino_runtime(
    path: Path, config: dict[str, Any], threads: int | None, device: str
) -> Runtime:
    """OpenVINO's CPU plugin on the bundle's ONNX file, in float32 (``INFERENCE_PRECISION_HINT``:
    without it a CPU with bfloat16 units would compute in bfloat16, about 1e-3 off), tuned for
    latency, with one inference request per calling thread."""
    try:
        import openvino
    except ImportError:
        raise ValueError(
            "kind='openvino' needs OpenVINO: pip install openvino (or the 'openvino' extra)"
        ) from None
    if device == "cuda":
        raise ValueError("kind='openvino' runs on the CPU here: use device='cpu' or kind='onnx'")
    settings = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads or usable_cores(),
    }
    try:
        compiled = openvino.Core().compile_model(str(path), "CPU", settings)
    except Exception as err:  # OpenVINO raises RuntimeError and its own types
        raise _unreadable(path, "compiled by OpenVINO", err, _first_line(err)) from None
    _check_names(
        path, [i.any_name for i in compiled.inputs], [o.any_name for o in compiled.outputs]
    )
    local = threading.local()  # an inference request serves one call at a time

    def run(batch: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        return np.array(request.infer({"images": batch})["embeddings"], copy=True)

    return Runtime("openvino", "cpu", config, run)

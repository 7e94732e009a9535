"""Export an :class:`Embedder` into a bundle folder: safetensors weights, TorchScript and ONNX,
each checked against the PyTorch model as it is written (read back by
:mod:`retrieval.bundle.runtime`)."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.bundle.format import BundleError
from retrieval.bundle.model_config import (
    MIN_COSINE,
    MODEL_CONFIG,
    ONNX,
    ONNX_OPSET,
    TORCHSCRIPT,
    WEIGHTS,
    build_embedder,
    model_config_for,
    model_config_text,
    quiet_tracing,
)
from retrieval.bundle.runtime import (
    Runtime,
    RuntimeModule,
    load_runtime,
    onnx_session,
    onnxruntime_module,
)
from retrieval.infra.checks import positive_int
from retrieval.models import Embedder

log = logging.getLogger(__name__)


class _Images(nn.Module):
    """``images -> embedder(images)``: a forward with one tensor argument for the tracers."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)


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


def _export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, exporter: str, any_size: bool
) -> None:
    """ONNX file "images" (batch, 3, S, S) -> "embeddings" (batch, D), weights inside; the
    batch is a dynamic axis, and so are height and width with ``any_size`` (images that keep
    their aspect, ``resize_mode=short``)."""
    common: dict[str, Any] = {
        "input_names": ["images"],
        "output_names": ["embeddings"],
        "opset_version": ONNX_OPSET[exporter],
    }
    if exporter == "legacy":
        sides = {2: "height", 3: "width"} if any_size else {}
        axes = {"images": {0: "batch", **sides}, "embeddings": {0: "batch"}}
        torch.onnx.export(module, (example,), str(path), dynamic_axes=axes, dynamo=False, **common)
    else:
        dim = torch.export.Dim
        free = {2: dim("height", min=16, max=8192), 3: dim("width", min=16, max=8192)}
        shapes = {"images": {0: dim("batch"), **(free if any_size else {})}}
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
    any_size: bool = False,
) -> dict[str, str]:
    """Write the embedder's four model files into the existing ``folder``; return
    ``{role: file name}`` for roles ``model_config``, ``weights``, ``torchscript``, ``onnx``.

    ``model_config``: the ``backbone`` and ``embedder`` fields of ``model.json`` that rebuild
    this embedder (:func:`~retrieval.bundle.model_config.model_architecture`); the file holds
    what :func:`~retrieval.bundle.model_config.model_config_for` makes of them. A float32
    CPU eval-mode copy is exported, so ``embedder`` is left as it was. ``onnx_exporter``:
    ``legacy`` (TorchScript-based, opset 17, fast) or ``dynamo`` (torch.export-based, opset
    18, ~10x slower). Before anything is written, the rebuilt eager model, the TorchScript
    file and (when onnxruntime is installed) the ONNX file are run on a batch of 3 and must
    agree with the PyTorch model (row cosine >= MIN_COSINE); all files then replace their
    previous versions at once. ``any_size``: the model takes images of any height and width
    (ONNX with dynamic spatial axes), checked on a 3:2 input too, as a ``short`` resize mode
    needs.
    """
    root = Path(folder)
    _check_export(root, embedder, input_size, onnx_exporter)
    config = model_config_for(embedder, model_config, input_size, any_size)
    module = copy.deepcopy(embedder).cpu().float().eval()
    module.channels_last = False
    module.backbone.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    probe = _Probe.of(module, input_size, any_size)
    traceable = _Images(module).eval()

    from safetensors.torch import save_file

    with _staged(root) as stage, quiet_tracing(), torch.no_grad():
        stage(MODEL_CONFIG).write_text(model_config_text(config), encoding="utf-8")
        save_file(state, str(stage(WEIGHTS)), metadata={"format": "pt"})
        if config["backbone"]["source"] != "torchscript":  # model.json cannot rebuild that
            rebuilt = build_embedder(config, stage(WEIGHTS))
            _agree("weights with model.json", rebuilt(probe.check).numpy(), probe.expected)
        traced = torch.jit.trace(traceable, probe.example, check_inputs=[(probe.check,)])
        torch.jit.save(traced, str(stage(TORCHSCRIPT)))
        script = torch.jit.load(str(stage(TORCHSCRIPT)))
        probe.agree("TorchScript", lambda x: script(torch.from_numpy(x)).numpy())
        # the legacy exporter traces again: from the traced module, as a module holding a
        # TorchScript backbone cannot be traced twice
        source = traced if onnx_exporter == "legacy" else traceable
        _export_onnx(source, probe.example, stage(ONNX), onnx_exporter, any_size)
        if onnxruntime_module() is not None:
            session = onnx_session(stage(ONNX), ["CPUExecutionProvider"], threads=None)
            probe.agree("ONNX model", lambda x: session.run(None, {"images": x})[0])
    return {
        "model_config": MODEL_CONFIG,
        "weights": WEIGHTS,
        "torchscript": TORCHSCRIPT,
        "onnx": ONNX,
    }


def _check_export(root: Path, embedder: Any, input_size: int, onnx_exporter: str) -> None:
    if not root.is_dir():
        raise BundleError(f"export folder {root} does not exist or is not a folder")
    if not isinstance(embedder, Embedder):
        raise TypeError(f"export_model takes an Embedder, got {type(embedder).__name__}")
    positive_int(input_size, "input_size")
    if onnx_exporter not in ONNX_OPSET:
        raise ValueError(
            f"onnx_exporter must be one of {sorted(ONNX_OPSET)}, got {onnx_exporter!r}"
        )


@dataclass
class _Probe:
    """Seeded inputs every exported file is checked on: ``example`` (what tracing sees),
    ``check`` (a batch of 3) and, for an any-size model, ``wide`` (a 3:2 image: dynamic
    spatial axes), with the PyTorch model's outputs on them."""

    example: torch.Tensor
    check: torch.Tensor
    expected: np.ndarray
    wide: torch.Tensor | None
    expected_wide: np.ndarray | None

    @classmethod
    def of(cls, module: torch.nn.Module, input_size: int, any_size: bool) -> _Probe:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(2, 3, input_size, input_size, generator=generator)
        check = torch.randn(3, 3, input_size, input_size, generator=generator)
        wide = torch.randn(1, 3, input_size, input_size * 3 // 2, generator=generator)
        with torch.no_grad():
            expected = module(check).numpy()
            expected_wide = module(wide).numpy() if any_size else None
        return cls(example, check, expected, wide if any_size else None, expected_wide)

    def agree(self, what: str, run: Callable[[np.ndarray], np.ndarray]) -> None:
        """``run`` (images -> embeddings) agrees with the PyTorch model on ``check`` (and on
        ``wide``)."""
        _agree(what, run(self.check.numpy()), self.expected)
        if self.wide is not None and self.expected_wide is not None:
            _agree(f"{what} (3:2 input)", run(self.wide.numpy()), self.expected_wide)


def compiled_embedder(
    embedder: Embedder,
    model_config: Mapping[str, Any],
    input_size: int,
    kind: str,
    device: str = "auto",
    threads: int | None = None,
    any_size: bool = False,
) -> RuntimeModule:
    """``embedder`` run by the ``kind`` runtime (``onnx``, ``openvino``, ``torchscript``,
    ``eager``) exactly as a bundle's model is: on the module's first call, exported by
    :func:`export_model` into a temporary folder (every file checked against PyTorch), loaded
    by :func:`~retrieval.bundle.runtime.load_runtime`, the folder then removed. ``any_size``:
    exported for inputs of any height and width (``resize_mode=short``).

    Raises (on the first call):
        BundleError: an exported file disagrees with the PyTorch model.
        ValueError: an unknown ``kind`` or one this machine cannot run (named).
    """

    def load() -> Runtime:
        log.info("exporting the model for the %s runtime", kind)
        with tempfile.TemporaryDirectory(prefix="retrieval-runtime-") as folder:
            export_model(embedder, folder, model_config, input_size, any_size=any_size)
            return load_runtime(folder, kind, threads=threads, device=device)

    return RuntimeModule(load, embedder, embedder.embedding_dim)

"""Embedding a dataset: batched inference with the one :class:`Embedder`, and a cache of the result.

Extraction runs in inference mode, channels-last (the Embedder's own setting), in bfloat16 autocast
on CUDA (float32 on the CPU, where bfloat16 is slower on most processors), with the loader's
workers, and shows a progress bar on a terminal. The output is always float32 rows of unit norm.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from retrieval.infra.io import atomic_write

if TYPE_CHECKING:
    from retrieval.data.dataset import ImageDataset

__all__ = [
    "Embeddings",
    "embed_loader",
    "fingerprint",
    "load_cached",
    "model_fingerprint",
    "ms_per_image",
    "resolve_device",
    "resolve_precision",
    "save_cached",
]

_CACHE_VERSION = 1


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of a dataset, in dataset order.

    Attributes:
        vectors: (n, dim) float32, L2-normalised rows.
        labels: (n,) int64 label codes (positions in the dataset's ``label_names``).
        is_query, is_gallery: (n,) bool protocol flags.
    """

    vectors: np.ndarray
    labels: np.ndarray
    is_query: np.ndarray
    is_gallery: np.ndarray

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, dim), got shape {self.vectors.shape}")
        for name in ("labels", "is_query", "is_gallery"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {getattr(self, name).shape}")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; any other torch
    device as given. Raises ValueError for a CUDA device when torch sees none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; use device='cpu'")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; any other value as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _autocast(device: torch.device, precision: str) -> Any:
    """Autocast context for ``precision``: ``auto`` (see :func:`resolve_precision`), ``bf16``,
    ``fp16`` or ``fp32``."""
    precision = resolve_precision(precision, device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in dtypes:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=dtypes[precision])


def embed_loader(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: bool | None = None,
    description: str = "embedding",
    progress_every_s: float = 30.0,
) -> Embeddings:
    """Embed every batch of ``loader`` (items as :class:`~retrieval.data.dataset.ImageDataset`
    yields them) and return the rows in dataset order (by each item's ``index``).

    Args:
        model: maps (B, 3, H, W) images to (B, dim) embeddings; put in eval mode here.
        loader: batches with ``image``, ``label``, ``index``, ``is_query``, ``is_gallery``.
        device: ``auto`` (CUDA when available), or a torch device.
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` autocast.
        progress: ``None`` or True: tqdm's bar when stderr is a terminal, else a plain line
            every ``progress_every_s`` seconds and one at the end
            (:func:`retrieval.infra.progress.track`); False: nothing.

    Raises:
        ValueError: the loader yields nothing, or the model returns non-finite values.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.eval().to(dev)
    total = len(loader) if isinstance(loader, Sized) else None
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("vec", "label", "index", "q", "g")}
    batches: Iterable[Mapping[str, torch.Tensor]] = loader
    if progress is not False:
        from retrieval.infra.progress import track  # Lightning's import only when it is shown

        batches = track(loader, total, description, unit="batch", every_s=progress_every_s)
    with torch.inference_mode(), _autocast(dev, precision):
        for batch in batches:
            out = model(batch["image"].to(dev, non_blocking=True)).float()
            parts["vec"].append(out.cpu().numpy())
            parts["label"].append(batch["label"].numpy())
            parts["index"].append(batch["index"].numpy())
            parts["q"].append(batch["is_query"].numpy())
            parts["g"].append(batch["is_gallery"].numpy())
    if not parts["vec"]:
        raise ValueError("the loader yielded no images to embed")
    vectors = np.concatenate(parts["vec"]).astype(np.float32, copy=False)
    if not np.isfinite(vectors).all():
        raise ValueError("the model produced NaN or infinite embeddings")
    order = np.argsort(np.concatenate(parts["index"]), kind="stable")
    return Embeddings(
        vectors=np.ascontiguousarray(vectors[order]),
        labels=np.concatenate(parts["label"]).astype(np.int64)[order],
        is_query=np.concatenate(parts["q"]).astype(bool)[order],
        is_gallery=np.concatenate(parts["g"]).astype(bool)[order],
    )


def ms_per_image(
    embedders: list[nn.Module], dataset: ImageDataset, device: torch.device, images: int = 16
) -> list[float]:
    """Median milliseconds per image of each embedder on the first ``images`` of ``dataset``:
    one batch, 5 timed runs of each after a warm-up, the embedders taking turns (a shared
    machine's noise falls on all of them alike)."""
    count = min(images, len(dataset))
    if count == 0:
        return [float("nan")] * len(embedders)
    batch = torch.stack([dataset[i]["image"] for i in range(count)]).to(device)
    models = [e.to(device).eval() for e in embedders]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(batch)
        for _ in range(5):
            for model, spent in zip(models, times, strict=True):
                start = time.perf_counter()
                model(batch)
                spent.append(time.perf_counter() - start)
    return [1000.0 * float(np.median(t)) / count for t in times]


def fingerprint(model: nn.Module, description: Mapping[str, Any]) -> str:
    """A hex digest of the model's weights and of ``description`` (dataset rows, preprocessing,
    precision...): equal fingerprints mean re-embedding would give the same vectors."""
    digest = hashlib.sha256()
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    steps = getattr(model, "search_steps", None)  # TTA changes outputs, not weights
    if callable(steps):
        digest.update(json.dumps(steps(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(embedder: nn.Module, preprocessing: Any) -> str:
    """What shards record and export checks: equal means the same weights and preprocessing
    (a :class:`~retrieval.data.preprocessing.Preprocessing`)."""
    return fingerprint(embedder, {"preprocessing": preprocessing.to_dict()})


def save_cached(embeddings: Embeddings, path: str | Path, key: str) -> None:
    """Write ``embeddings`` to ``path`` (.npz) atomically, tagged with the fingerprint ``key``."""
    with atomic_write(path) as handle:
        np.savez(
            handle,
            version=np.int64(_CACHE_VERSION),
            key=np.array(key),
            vectors=embeddings.vectors,
            labels=embeddings.labels,
            is_query=embeddings.is_query,
            is_gallery=embeddings.is_gallery,
        )


def load_cached(path: str | Path, key: str) -> Embeddings | None:
    """The embeddings cached at ``path`` if they were made with fingerprint ``key``, else None
    (missing, stale or unreadable caches are simply recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != _CACHE_VERSION or str(data["key"]) != key:
                return None
            return Embeddings(
                vectors=data["vectors"],
                labels=data["labels"],
                is_query=data["is_query"],
                is_gallery=data["is_gallery"],
            )
    except (OSError, KeyError, ValueError):
        return None

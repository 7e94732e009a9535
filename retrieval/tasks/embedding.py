"""How evaluate and export embed images: the model as ``cfg.inference`` runs it (eager PyTorch
or an exported runtime, in its precision) and the embedding cache keyed by the weights, the
images and the preprocessing."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from retrieval.data.dataset import ImageDataset, eval_loader
from retrieval.data.preprocessing import Preprocessing
from retrieval.models.extract import (
    Embeddings,
    embed_loader,
    fingerprint,
    load_cached,
    resolve_device,
    resolve_precision,
    save_cached,
)
from retrieval.tasks.models import LoadedModel, embedder_arguments

log = logging.getLogger(__name__)


def inference_embedder(
    cfg: DictConfig, model: LoadedModel, preprocessing: Preprocessing, device: torch.device
) -> torch.nn.Module:
    """What embeds images under ``cfg.inference``: the model itself (``runtime=eager``), or the
    model exported and run by ONNX Runtime, OpenVINO or TorchScript as a bundle's model is
    (checked against PyTorch on export), which computes in float32."""
    kind = cfg.inference.runtime
    if kind == "eager":
        return model.embedder
    if cfg.inference.precision not in ("auto", "fp32"):
        raise ValueError(
            f"inference.runtime={kind} computes in float32, but inference.precision="
            f"{cfg.inference.precision}: use inference.precision=fp32 or inference.runtime=eager"
        )
    from retrieval.bundle.model_config import model_architecture
    from retrieval.bundle.model_export import compiled_embedder

    return compiled_embedder(
        model.embedder,
        model_architecture(embedder_arguments(model)),
        preprocessing.input_size,
        kind,
        device.type,
        any_size=preprocessing.any_size,
    )


def inference_precision(cfg: DictConfig, device: torch.device) -> str:
    """The precision models compute in under ``cfg.inference``: ``fp32`` for an exported
    runtime, else ``inference.precision`` resolved for ``device`` (``auto``: bf16 on CUDA)."""
    if cfg.inference.runtime != "eager":
        return "fp32"
    return resolve_precision(cfg.inference.precision, device)


def _file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file; (-1, -1) when it cannot be read (loading reports it)."""
    try:
        found = os.stat(path)
    except OSError:
        return (-1, -1)
    return (found.st_size, found.st_mtime_ns)


def _read_cache(cache: Path, key: str) -> Embeddings | None:
    """The embeddings cached in ``cache`` for ``key``; None when missing or stale, and when
    damaged (truncated, a bad CRC), which is logged in one line: the caller embeds again and
    writes the file anew."""
    try:
        return load_cached(cache, key)
    except (zipfile.BadZipFile, EOFError) as err:
        log.warning("the embedding cache %s is damaged (%s): embedding again", cache, err)
        return None


def embed_dataset(
    cfg: DictConfig,
    embedder: torch.nn.Module,
    dataset: ImageDataset,
    description: dict[str, Any],
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> tuple[Embeddings, Path | None]:
    """Embeddings of ``dataset``, from the cache when the same weights already embedded the same
    images the same way (``description``); returns them and the cache file (None: no cache).
    The size and modification time of every file in ``description["paths"]`` join the key, so
    an image rewritten under the same path (regenerated queries) is embedded again."""
    run = cfg.inference
    precision = inference_precision(cfg, device)
    files = [_file_stamp(path) for path in description.get("paths", [])]
    key = fingerprint(
        embedder,
        {
            **description,
            "files": files,
            "precision": precision,
            "device": device.type,
            "runtime": run.runtime,
        },
    )
    cache = Path(run.cache_dir) / f"{key[:32]}.npz" if run.use_cache else None
    embeddings = _read_cache(cache, key) if cache is not None else None
    if embeddings is not None:
        log.info("embeddings read from the cache %s", cache)
        return embeddings, cache
    loader = eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")
    embeddings = embed_loader(embedder, loader, device, precision)
    if cache is not None:
        save_cached(embeddings, cache, key)
    return embeddings, cache


def embed_rows(
    cfg: DictConfig,
    embedder: torch.nn.Module,
    dataset: Any,
    preprocessing: dict[str, Any],
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> tuple[Embeddings, Path | None]:
    """:func:`embed_dataset` of an :class:`~retrieval.data.dataset.ImageDataset`, its cache
    key described by the dataset itself (``cache_description``) and ``preprocessing``."""
    description = {**dataset.cache_description(), "pre": preprocessing}
    return embed_dataset(cfg, embedder, dataset, description, batch_size, num_workers, device)


@dataclass
class TaskEmbedding:
    """How a task embeds images with its loaded model under ``cfg.inference``: ``runner``
    (:func:`inference_embedder`) stands in for the model's own embedder, other embedders (a
    TTA copy) run as they are; every call goes through the embedding cache."""

    cfg: DictConfig
    model: LoadedModel
    runner: torch.nn.Module
    preprocessing: dict[str, Any]
    batch_size: int
    num_workers: int
    device: torch.device

    @classmethod
    def of(cls, cfg: DictConfig, model: LoadedModel, datamodule: Any) -> TaskEmbedding:
        """The embedding of ``model`` on the device ``cfg.inference`` asks, with the data's
        preprocessing, batch size and loading processes."""
        device = resolve_device(cfg.inference.device)
        pre = datamodule.preprocessing
        return cls(
            cfg,
            model,
            inference_embedder(cfg, model, pre, device),
            pre.to_dict(),
            int(cfg.inference.batch_size or datamodule.eval_batch_size),
            datamodule.num_workers,
            device,
        )

    def cached(self, embedder: torch.nn.Module, dataset: Any) -> tuple[Embeddings, Path | None]:
        """:func:`embed_rows` of ``dataset`` (an ImageDataset): its embeddings and the cache
        file."""
        embedder = self.runner if embedder is self.model.embedder else embedder
        args = (self.preprocessing, self.batch_size, self.num_workers, self.device)
        return embed_rows(self.cfg, embedder, dataset, *args)

    def __call__(self, embedder: torch.nn.Module, dataset: Any) -> Embeddings:
        """The embeddings of ``dataset`` by ``embedder`` (see :meth:`cached`)."""
        return self.cached(embedder, dataset)[0]

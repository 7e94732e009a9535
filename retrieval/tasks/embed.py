"""``embed(cfg)``: embed a folder or a manifest into shards (:mod:`retrieval.index.shards`), this
worker's share of them, skipping the shards already finished. Called by ``embed.py``."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from retrieval.data.dataset import ImageDataset, eval_loader
from retrieval.data.images import ImageLoadError, find_unreadable, images_in_folder
from retrieval.data.manifest import ManifestRow, folder_labels, read_manifest
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.transforms import eval_transform
from retrieval.index.shards import ShardContent, ShardItem, ShardPlan, embed_shards, worker_identity
from retrieval.infra.io import sha256_file
from retrieval.models.extract import (
    embed_loader,
    model_fingerprint,
    resolve_device,
)
from retrieval.tasks.embedding import inference_embedder, inference_precision
from retrieval.tasks.models import (
    LoadedModel,
    bundle_input,
    describe_model,
    load_model,
    model_preprocessing,
)

log = logging.getLogger(__name__)

__all__ = ["ShardEmbedder", "embed", "model_fingerprint"]


def preprocessing_of(cfg: DictConfig, model: LoadedModel) -> Preprocessing:
    """The preprocessing export.py gives the same model (:func:`bundle_input`): ``image_size``
    and ``resize_mode`` when set, else the checkpoint's training data's (see
    :func:`model_preprocessing`), else the backbone's own size, squashed."""
    chosen = bundle_input(cfg, model)
    size = chosen.get("image_size")
    if size is None and model.checkpoint is not None:
        size = (model.checkpoint.run_config.get("data") or {}).get("image_size")
    return model_preprocessing(model).with_size(size, chosen.get("resize_mode"))


def _plan_items(cfg: DictConfig) -> tuple[list[ShardItem], str]:
    """The items to embed, in a fixed order, and where they come from."""
    if bool(cfg.get("images")) == bool(cfg.get("manifest")):
        raise ValueError("pass exactly one of images=DIR or manifest=FILE.csv")
    if cfg.get("images"):
        root = Path(cfg.images).resolve()
        paths = images_in_folder(root, name=f"images={root}")
        labels = folder_labels(paths, root, cfg.labels)
        return [ShardItem(str(p), label) for p, label in zip(paths, labels, strict=True)], str(root)
    manifest = Path(cfg.manifest).resolve()
    rows = read_manifest(manifest, check_files=False)  # missing files: skipped per shard
    if cfg.get("split"):
        rows = [r for r in rows if r.split == cfg.split]
        if not rows:
            raise ValueError(f"{manifest} has no rows of split {cfg.split!r}")
    items = [ShardItem(str(r.path.resolve()), r.label, dict(r.extra)) for r in rows]
    return items, f"{manifest}" + (f":{cfg.split}" if cfg.get("split") else "")


def _device(cfg: DictConfig) -> torch.device:
    """``device=auto`` on a machine with several GPUs: this worker's local rank picks one."""
    device = resolve_device(cfg.inference.device)
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if cfg.inference.device == "auto" and device.type == "cuda" and local is not None:
        device = torch.device("cuda", int(local) % torch.cuda.device_count())
    return device


class ShardEmbedder:
    """Embeds one shard's items (``(shard, items) -> ShardContent``, what
    :func:`~retrieval.index.shards.embed_shards` calls): unreadable ones skipped with a
    warning, or an error when ``strict`` (its message ends with ``fix``)."""

    def __init__(
        self,
        embedder: torch.nn.Module,
        dim: int,
        pre: Preprocessing,
        device: torch.device,
        batch_size: int,
        num_workers: int,
        precision: str,
        strict: bool = False,
        fix: str = "fix or remove them",
    ) -> None:
        self.embedder, self.dim, self.device = embedder, dim, device
        self.batch_size, self.num_workers, self.precision = batch_size, num_workers, precision
        self.strict, self.fix = strict, fix
        self.transform = eval_transform(pre)

    def __call__(self, shard: int, items: list[ShardItem]) -> ShardContent:
        paths = [Path(item.uri) for item in items]
        reasons = {b.path: b.reason for b in find_unreadable(paths)}
        if reasons:
            first = "; ".join(f"{p} ({r})" for p, r in list(reasons.items())[:5])
            where = f"{len(reasons)} of {len(paths)} images of shard {shard}"
            if self.strict:
                raise ImageLoadError(f"{where} cannot be read: {first}; {self.fix}")
            warnings.warn(
                f"skipping {where} that cannot be read: {first}; strict_images=true makes "
                "this an error",
                UserWarning,
                stacklevel=2,
            )
        kept = [item for item, p in zip(items, paths, strict=True) if p not in reasons]
        if not kept:
            empty = np.empty((0, self.dim), np.float32)
            return ShardContent(empty, [], [(str(p), r) for p, r in reasons.items()])
        rows = [ManifestRow(Path(i.uri), i.label or "", "gallery") for i in kept]
        loader = eval_loader(
            ImageDataset(rows, self.transform),
            self.batch_size,
            self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        vectors = embed_loader(
            self.embedder, loader, self.device, self.precision, description=f"shard {shard}"
        ).vectors
        done = [ShardItem(i.uri, i.label, i.extra, sha256_file(i.uri)) for i in kept]
        return ShardContent(vectors, done, [(str(p), r) for p, r in reasons.items()])


def embed(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Embed this worker's unfinished shards per ``cfg``; returns ``({"embedded": n,
    "kept": n, "shards": total, "out_dir": path}, {"plan": ShardPlan, "model": LoadedModel})``.

    Raises:
        ValueError: neither or both of images= / manifest=, no images, bad rank / world size.
        ShardError: ``out_dir`` holds shards of other images, shard size or model.
    """
    rank, world = worker_identity(cfg.rank, cfg.world_size)
    items, source = _plan_items(cfg)
    plan = ShardPlan(items, int(cfg.shard_size))
    model = load_model(cfg)
    pre = preprocessing_of(cfg, model)
    device = _device(cfg)
    precision = inference_precision(cfg, device)
    header = {
        "dim": int(model.embedder.embedding_dim),
        "model_fingerprint": model_fingerprint(model.embedder, pre),
        "preprocessing": pre.to_dict(),
        "source": source,
        "protocol": describe_model(model, pre.to_dict()),
        "embedding": {
            "precision": precision,
            "device_type": device.type,
            "runtime": cfg.inference.runtime,
        },
    }
    out = Path(cfg.out_dir)
    log.info("worker %d of %d: %d shards of %d images", rank, world, plan.num_shards, len(items))
    runner = inference_embedder(cfg, model, pre, device)
    shard_embedder = ShardEmbedder(
        runner,
        int(model.embedder.embedding_dim),
        pre,
        device,
        batch_size=int(cfg.inference.batch_size),
        num_workers=int(cfg.num_workers),
        precision=precision,
        strict=bool(cfg.strict_images),
    )
    done = embed_shards(out, plan, header, shard_embedder, rank, world)
    summary = {
        "out_dir": str(out),
        "shards": plan.num_shards,
        "embedded": len(done["embedded"]),
        "kept": len(done["kept"]),
    }
    print(
        f"shards: {out} (worker {rank} of {world}): embedded {summary['embedded']}, already "
        f"finished {summary['kept']}, of {plan.num_shards} in all",
        flush=True,
    )
    return summary, {"plan": plan, "model": model, "done": done}

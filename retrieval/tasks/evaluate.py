"""``evaluate(cfg)``: score a trained checkpoint, a pretrained backbone as-is, or a file of
precomputed embeddings, and write the report. Called by ``evaluate.py`` and by tests."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from retrieval.checkpoints import TrainingCheckpoint, load_embedder_weights, read_checkpoint
from retrieval.evaluation import RetrievalResult, evaluate_embeddings, evaluate_protocol
from retrieval.evaluation.npz import read_embeddings_npz, write_embeddings_npz
from retrieval.extract import embed_loader, fingerprint, load_cached, resolve_device, save_cached
from retrieval.io import sha256_file
from retrieval.tasks.config import CONF_DIR
from retrieval.tasks.evaluate_report import write_report

log = logging.getLogger(__name__)


@dataclass
class EvalInputs:
    """What gets scored, with what the report needs to show it."""

    result: RetrievalResult
    query_labels: np.ndarray  # (nq,) label names of the whole query set
    gallery_labels: np.ndarray  # (ng,)
    query_paths: np.ndarray | None  # (nq,) image paths, when known
    gallery_paths: np.ndarray | None
    ks: list[int]
    protocol: dict[str, Any] = field(default_factory=dict)


def _options(cfg: DictConfig, ks: list[int]) -> dict[str, Any]:
    return {
        "ks": ks,
        "metrics": list(cfg.metrics),
        "factory": cfg.index.factory,
        "search_params": cfg.index.search_params or "",
        "compare_exact": bool(cfg.index.compare_exact),
        "keep_neighbors": int(cfg.report.top_k),
        "chunk_size": int(cfg.chunk_size),
        "seed": int(cfg.seed),
    }


def _from_npz(cfg: DictConfig) -> EvalInputs:
    path = Path(cfg.embeddings)
    data = read_embeddings_npz(path)
    ks = list(cfg.ks or [1, 2, 4, 8])
    try:
        result = evaluate_embeddings(
            data.query, data.query_labels, data.gallery, data.gallery_labels, **_options(cfg, ks)
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    loo = data.gallery is None
    return EvalInputs(
        result=result,
        query_labels=data.query_labels,
        gallery_labels=data.query_labels if loo else data.gallery_labels,  # type: ignore[arg-type]
        query_paths=data.query_paths,
        gallery_paths=data.query_paths if loo else data.gallery_paths,
        ks=ks,
        protocol={
            "evaluated": "embeddings file",
            "embeddings_file": {"path": str(path.resolve()), "sha256": sha256_file(path)},
            "data": {
                "protocol": "leave-one-out" if loo else "query/gallery",
                "queries": len(data.query),
                "gallery": len(data.query if loo else data.gallery),  # type: ignore[arg-type]
                "labels": int(np.unique(data.query_labels).size),
                "dim": int(data.query.shape[1]),
            },
        },
    )


def _embedder_config(cfg: DictConfig, ckpt: TrainingCheckpoint | None) -> DictConfig:
    """The Embedder to build: the checkpoint's own (weights come from the checkpoint, so nothing
    is downloaded), else ``cfg.embedder`` (the backbone as-is)."""
    if ckpt is None:
        return cfg.embedder
    node = OmegaConf.create(ckpt.run_config["model"]["embedder"])
    node.backbone.pretrained = False
    node.backbone.weights = None
    return node


def _data_config(cfg: DictConfig, ckpt: TrainingCheckpoint | None) -> DictConfig:
    """``data=`` when given, else the checkpoint's training data, else the built-in demo."""
    if cfg.get("data") is not None:
        return cfg.data
    if ckpt is not None:
        return OmegaConf.create(ckpt.run_config["data"])
    with open_dict(cfg):  # inside cfg, ${paths...} resolves against this run
        cfg.data = OmegaConf.load(CONF_DIR / "data" / "demo.yaml")
    return cfg.data


def _protocol_of_model(
    cfg: DictConfig, ckpt: TrainingCheckpoint | None, embedder_cfg: DictConfig, datamodule: Any
) -> dict[str, Any]:
    model = OmegaConf.to_container(embedder_cfg, resolve=True)
    assert isinstance(model, dict)
    backbone = model.pop("backbone")
    model.pop("_target_", None)
    protocol: dict[str, Any] = {
        "evaluated": "checkpoint" if ckpt else "pretrained backbone as-is",
        "model": {
            "backbone": backbone.get("name"),
            "backbone_source": backbone.get("source", "timm"),
            "weights": (
                f"checkpoint {ckpt.path}"
                if ckpt
                else backbone.get("weights")
                or ("pretrained" if backbone.get("pretrained") else "random")
            ),
            **model,
        },
        "preprocessing": datamodule.preprocessing.to_dict(),
    }
    if ckpt is not None:
        run = ckpt.run_config
        protocol["checkpoint"] = {
            "path": str(ckpt.path.resolve()),
            "sha256": ckpt.sha256,
            "epoch": ckpt.epoch,
            "global_step": ckpt.global_step,
        }
        protocol["training"] = {
            "seed": run.get("seed"),
            "sampler": {
                k: v for k, v in (run.get("sampler") or {}).items() if not k.startswith("_")
            },
            "loss": (run.get("loss") or {}).get("_target_"),
            "miner": (run.get("miner") or {}).get("_target_"),
            "epochs": (run.get("trainer") or {}).get("max_epochs"),
        }
    return protocol


def _from_model(cfg: DictConfig) -> EvalInputs:
    ckpt = read_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    embedder_cfg = _embedder_config(cfg, ckpt)
    embedder = instantiate(embedder_cfg)
    if ckpt is not None:
        load_embedder_weights(embedder, ckpt)
    data_cfg = _data_config(cfg, ckpt)
    datamodule = instantiate(data_cfg, _partial_=True)(
        preprocessing=embedder.preprocessing, seed=cfg.seed, val_split=cfg.split
    )
    dataset = datamodule.eval_set()
    paths = np.array([str(row.path) for row in dataset.rows])
    device = resolve_device(cfg.device)
    key = fingerprint(
        embedder,
        {
            "paths": paths.tolist(),
            "labels": [row.label for row in dataset.rows],
            "preprocessing": datamodule.preprocessing.to_dict(),
            "precision": cfg.precision,
            "device": device.type,
        },
    )
    cache = Path(cfg.cache_dir) / f"{key[:32]}.npz"
    embeddings = load_cached(cache, key) if cfg.use_cache else None
    if embeddings is None:
        loader = DataLoader(
            dataset,
            batch_size=int(cfg.batch_size or datamodule.eval_batch_size),
            num_workers=datamodule.num_workers,
            pin_memory=device.type == "cuda",
        )
        embeddings = embed_loader(embedder, loader, device, cfg.precision)
        if cfg.use_cache:
            save_cached(embeddings, cache, key)
    else:
        log.info("embeddings read from the cache %s", cache)
    names = dataset.label_names[embeddings.labels]
    ks = list(cfg.ks or datamodule.eval_ks)
    result, q_rows, g_rows = evaluate_protocol(
        embeddings.vectors, names, embeddings.is_query, embeddings.is_gallery, **_options(cfg, ks)
    )
    if cfg.save_embeddings:
        _save_embeddings(
            Path(cfg.paths.output_dir) / "embeddings.npz",
            embeddings.vectors,
            names,
            paths,
            q_rows,
            g_rows,
        )
    protocol = _protocol_of_model(cfg, ckpt, embedder_cfg, datamodule)
    loo = len(q_rows) == len(g_rows) == len(names) and bool(embeddings.is_query.all())
    protocol["data"] = {
        "dataset": str(datamodule.manifest),
        "split": cfg.split,
        "protocol": "leave-one-out" if loo else "query/gallery",
        "images": len(names),
        "labels": int(np.unique(names).size),
        "queries": len(q_rows),
        "gallery": len(g_rows),
        "embedding_cache": str(cache) if cfg.use_cache else None,
    }
    protocol["model"]["embedding_dim"] = int(embeddings.vectors.shape[1])
    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    )
    protocol["evaluation_device"] = {"device": str(device), "precision": precision}
    return EvalInputs(
        result, names[q_rows], names[g_rows], paths[q_rows], paths[g_rows], ks, protocol
    )


def _save_embeddings(
    path: Path,
    vectors: np.ndarray,
    labels: np.ndarray,
    paths: np.ndarray,
    q_rows: np.ndarray,
    g_rows: np.ndarray,
) -> None:
    """Write the embeddings in the public npz layout, so ``embeddings=`` can re-score them."""
    if len(q_rows) == len(g_rows) == len(vectors) and (q_rows == g_rows).all():
        write_embeddings_npz(path, embeddings=vectors, labels=labels, paths=paths)
    else:
        write_embeddings_npz(
            path,
            query=vectors[q_rows],
            query_labels=labels[q_rows],
            gallery=vectors[g_rows],
            gallery_labels=labels[g_rows],
            query_paths=paths[q_rows],
            gallery_paths=paths[g_rows],
        )


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("retrieval", "torch", "timm", "faiss-cpu", "numpy", "pytorch-metric-learning"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate per ``cfg``; returns ``(metrics, objects)`` with metrics named
    ``{split}/{name}`` (``test/recall@1``...) and the report written to the run directory."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    inputs = _from_npz(cfg) if cfg.get("embeddings") else _from_model(cfg)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    inputs.protocol["evaluation"] = {
        "ks": inputs.ks,
        "metrics": list(cfg.metrics),
        "index": dict(inputs.result.index),
        "seed": int(cfg.seed),
    }
    inputs.protocol["versions"] = _versions()
    inputs.protocol["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    metrics = write_report(inputs, cfg, output_dir, loggers)
    return metrics, {"inputs": inputs, "loggers": loggers}

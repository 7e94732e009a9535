"""The model a task's config describes: a trained checkpoint or a backbone as-is, with its
preprocessing, the data config it was trained on, the arguments it was built with, and what a
report says of it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from retrieval.data.preprocessing import Preprocessing
from retrieval.models import Embedder
from retrieval.tasks.config import CONF_DIR, current_targets
from retrieval.training.checkpoints import (
    TrainingCheckpoint,
    load_embedder_weights,
    read_checkpoint,
)


@dataclass
class LoadedModel:
    """An Embedder with the config it was built from and the checkpoint it came from."""

    embedder: Embedder
    config: DictConfig
    checkpoint: TrainingCheckpoint | None


def load_model(cfg: DictConfig) -> LoadedModel:
    """``ckpt_path`` -> the run's Embedder with the checkpoint's weights; else ``cfg.embedder``.
    The checkpoint's run config names each ``_target_`` where it is now (``current_targets``)."""
    ckpt = read_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if ckpt is not None:
        ckpt = replace(ckpt, run_config=current_targets(ckpt.run_config))
    config = _embedder_config(cfg, ckpt)
    embedder = instantiate(config)
    if ckpt is not None:
        load_embedder_weights(embedder, ckpt)
    return LoadedModel(embedder, config, ckpt)


def _embedder_config(cfg: DictConfig, ckpt: TrainingCheckpoint | None) -> DictConfig:
    """The Embedder to build: the checkpoint's own (weights come from the checkpoint, so nothing
    is downloaded), else ``cfg.embedder`` (the backbone as-is)."""
    if ckpt is None:
        return cfg.embedder
    node = OmegaConf.create(ckpt.run_config["model"]["embedder"])
    node.backbone.pretrained = False
    node.backbone.weights = None
    return node


def model_preprocessing(loaded: LoadedModel) -> Preprocessing:
    """The backbone's preprocessing with the resize mode its checkpoint was trained with (the
    data config's ``resize_mode``, when set, overrides it); the backbone's own without one."""
    pre = loaded.embedder.preprocessing
    if loaded.checkpoint is None:
        return pre
    return pre.with_size(None, (loaded.checkpoint.run_config.get("data") or {}).get("resize_mode"))


def bundle_input(cfg: DictConfig, loaded: LoadedModel) -> dict[str, Any]:
    """How export.py and embed.py see an image: the data module's ``image_size`` and
    ``resize_mode``, ``cfg.image_size`` / ``cfg.resize_mode`` when set; else a checkpoint's
    own (its training data's; nothing to override), and for a backbone as-is its own input
    size with the whole image squashed to it (not a data config's training size, nor a centre
    crop that cuts away borders and overlays)."""
    size, mode = cfg.get("image_size"), cfg.get("resize_mode")
    if loaded.checkpoint is None:
        size = size or loaded.embedder.preprocessing.input_size
        mode = mode or "squash"
    chosen = {"image_size": size, "resize_mode": mode}
    return {key: value for key, value in chosen.items() if value is not None}


def embedder_arguments(loaded: LoadedModel) -> dict[str, Any]:
    """The arguments ``loaded.embedder`` was built with, as plain data: its config resolved,
    without Hydra's ``_target_`` keys (what
    :func:`~retrieval.bundle.model_config.model_architecture` describes in ``model.json``)."""
    arguments = OmegaConf.to_container(loaded.config, resolve=True)
    assert isinstance(arguments, dict)
    arguments.pop("_target_", None)
    backbone = dict(arguments["backbone"])
    backbone.pop("_target_", None)
    return {**arguments, "backbone": backbone}


def data_config(cfg: DictConfig, ckpt: TrainingCheckpoint | None) -> DictConfig:
    """``data=`` when given, else the checkpoint's training data, else the built-in demo."""
    if cfg.get("data") is not None:
        return cfg.data
    if ckpt is not None:
        return OmegaConf.create(ckpt.run_config["data"])
    with open_dict(cfg):  # inside cfg, ${paths...} resolves against this run
        cfg.data = OmegaConf.load(CONF_DIR / "data" / "demo.yaml")
    return cfg.data


def describe_model(loaded: LoadedModel, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The model half of a result's protocol: what was evaluated or exported, and how."""
    ckpt = loaded.checkpoint
    model = OmegaConf.to_container(loaded.config, resolve=True)
    assert isinstance(model, dict)
    backbone = model.pop("backbone")
    model.pop("_target_", None)
    model["embedding_dim"] = loaded.embedder.embedding_dim
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
        "preprocessing": preprocessing,
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

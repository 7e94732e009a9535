"""``train(cfg)``: compose the objects a config describes, validate the untrained model, fit,
and write the run's metrics. Called by ``train.py`` and directly by tests.

Under distributed training every process runs ``train(cfg)``; only global rank 0 writes the run
directory's files and prints the report (Lightning's checkpoints and loggers are rank-0 aware)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from retrieval.evaluation import evaluate_protocol
from retrieval.evaluation.reports import text_table
from retrieval.infra.hardware import keep_freed_memory, training_precision
from retrieval.infra.io import atomic_write
from retrieval.infra.progress import first_process, progress_bar
from retrieval.models import Embedder
from retrieval.models.extract import embed_loader
from retrieval.tasks.runs import point_latest
from retrieval.training.loggers import describe_wandb, finish_wandb, quiet_third_party

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers), skipping nulls."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Every object of a training run, with the data read and checked before anything trains."""
    quiet_third_party()
    keep_freed_memory()  # no page faults for the activations every step frees and allocates
    pl.seed_everything(cfg.seed, workers=True)
    embedder = instantiate(cfg.model.embedder)
    # Partial: a dataclass passed through instantiate() would be turned into a config.
    datamodule = instantiate(cfg.data, _partial_=True)(
        preprocessing=embedder.preprocessing, sampler=instantiate(cfg.sampler), seed=cfg.seed
    )
    datamodule.setup("fit")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    with open_dict(cfg):  # what proxy losses are sized by (conf/train.yaml)
        cfg.num_train_labels = datamodule.num_train_labels
        cfg.embedding_size = embedder.embedding_dim
        # bf16 where the CPU computes it natively, else float32 (said once), as recorded
        cfg.trainer.precision = training_precision(cfg.trainer.get("precision", "32-true"), on_cpu)
    module = instantiate(cfg.model, embedder=embedder)
    # Set afterwards: instantiate() would build the _target_ nodes inside the dict.
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(c, ProgressBar) for c in callbacks
    ):
        callbacks.append(progress_bar())  # the bar on a terminal, plain lines in a log
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {
        "embedder": embedder,
        "datamodule": datamodule,
        "module": module,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def pretrained_baseline(module: Any, datamodule: Any, device: Any) -> dict[str, float]:
    """Validation metrics of the backbone as-is: average-pooled features, no head, the same
    vectors ``python evaluate.py`` scores for a pretrained backbone. Shares the module's
    backbone (read only, before training); keys ``pretrained/<metric>``."""
    embedder = module.model
    as_is = Embedder(embedder.backbone, None, "avg", channels_last=embedder.channels_last)
    training = module.training
    loader = datamodule.val_dataloader()  # one process: the whole split, in order
    found = embed_loader(as_is, loader, device=device, progress=False, description="pretrained")
    module.train(training)  # embedding put the shared backbone in eval mode; fit keeps modes
    result, _, _ = evaluate_protocol(
        found.vectors,
        found.labels,
        found.is_query,
        found.is_gallery,
        ks=module.eval_ks,
        metrics=module.eval_metrics,
    )
    return {f"pretrained/{k}": float(v) for k, v in result.metrics.items()}


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train per ``cfg``; returns ``(metrics, objects)``. ``metrics`` holds the backbone as-is
    (``pretrained/...``, with ``baseline_pretrained`` on one process), the untrained model with
    its new head (``baseline/...``), the last validation (``val/...``) and the best monitored
    value."""
    output_dir = Path(cfg.paths.output_dir)
    if first_process():
        _write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    objects = build(cfg)
    trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
    if trainer.is_global_zero:
        print(_model_line(module, cfg), flush=True)  # Lightning's summary table is off
        point_latest(output_dir)  # a start that failed before here never becomes "latest"

    metrics: dict[str, Any] = {}
    if cfg.get("ckpt_path") is None:
        if cfg.get("baseline_pretrained") and trainer.world_size == 1:
            metrics.update(pretrained_baseline(module, datamodule, trainer.strategy.root_device))
        if cfg.get("baseline_untrained", True):
            baseline = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
            metrics.update({k.replace("val/", "baseline/"): v for k, v in baseline.items()})
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:  # last.ckpt written and the resume printed (RunCheckpoint)
        raise SystemExit(128 + signal.SIGTERM) from None  # not 0: "train && export" stops
    metrics.update(
        {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    )

    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[f"best/{cfg.monitor}"] = float(checkpoint.best_model_score)
        metrics["best/checkpoint"] = checkpoint.best_model_path
    metrics["output_dir"] = str(output_dir)
    if trainer.is_global_zero:
        _write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _report(metrics, cfg.monitor, objects["loggers"])
    return metrics, objects


def _model_line(module: Any, cfg: DictConfig) -> str:
    """``model: tf_efficientnet_lite0, gem pooling, 512-d: 3.4 M of 4.0 M parameters train``."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trained = sum(p.numel() for p in params if p.requires_grad)
    embedder = cfg.model.embedder
    name = embedder.get("backbone", {}).get("name", type(module.model.backbone).__name__)
    return (
        f"model: {name}, {embedder.get('pooling', 'avg')} pooling, "
        f"{module.model.embedding_dim}-d: {trained / 1e6:.1f} M of {total / 1e6:.1f} M "
        "parameters train"
    )


def _report(metrics: dict[str, Any], monitor: str, loggers: list[Any]) -> None:
    """Print the final table: every validation metric before and after training."""

    def cell(value: float | None, name: str) -> float | str | None:
        return f"{value:.0f}" if value is not None and name.endswith("queries") else value

    names = sorted(k.split("/", 1)[1] for k in metrics if k.startswith("val/"))
    stages = [("pretrained", "pretrained"), ("baseline", "untrained"), ("val", "last epoch")]
    shown = [(key, title) for key, title in stages if any(k.startswith(key + "/") for k in metrics)]
    best = metrics.get(f"best/{monitor}")
    rows = [
        [
            "val/" + name,
            *(cell(metrics.get(f"{key}/{name}"), name) for key, _ in shown),
            *([best if f"val/{name}" == monitor else None] if best is not None else []),
        ]
        for name in names
    ]
    titles = [title for _, title in shown] + (["best"] if best is not None else [])
    lines = [text_table(["metric", *titles], rows)]
    if "pretrained/recall@1" in metrics:
        lines.append(
            "pretrained = the backbone as-is (average-pooled features, no head), as "
            "evaluate.py scores it; untrained = the model with its new head before training"
        )
    if f"best/{monitor}" in metrics:
        lines.append(
            f"best {monitor} = {metrics[f'best/{monitor}']:.4f} ({metrics['best/checkpoint']})"
        )
    for logger in loggers:
        if logger.__class__.__name__ == "WandbLogger":
            lines.append(describe_wandb(logger))
            finish_wandb(logger)
    lines.append(f"run directory: {metrics['output_dir']}")
    print("\n".join(lines), flush=True)

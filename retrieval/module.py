"""The LightningModule: training and validation steps and optimizers. Lightning runs the loop;
the model, the losses, the index and the metrics live in their own modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from retrieval.evaluation import evaluate_protocol
from retrieval.losses import build_loss, compute_loss
from retrieval.models.embedder import Embedder


class RetrievalModule(pl.LightningModule):
    """Metric learning of an :class:`Embedder`.

    Args:
        embedder: the Embedder being trained.
        loss: a pytorch-metric-learning loss, or a partial constructor of one (``num_classes`` and
            ``embedding_size`` are filled in when it accepts them).
        miner: an optional pytorch-metric-learning miner.
        optimizer: partial constructor taking the parameter groups.
        scheduler: partial constructor taking ``(optimizer, total_steps=...)``; stepped every
            optimizer step.
        num_classes: number of training labels.
        head_lr_multiplier: learning rate of pooling and head relative to the backbone's.
        loss_lr: learning rate of the loss's own parameters (proxies, class weights).
        frozen_backbone_epochs: epochs at the start during which only the head and the loss
            parameters train (the backbone runs in eval mode without gradients).
        eval_ks: the k of recall@k reported by validation.
        eval_metrics: metric families validation reports (see
            :func:`retrieval.evaluation.evaluate_embeddings`).
        run_config: plain dict stored in checkpoints so a run can be rebuilt from them.
    """

    def __init__(
        self,
        embedder: Embedder,
        loss: Callable[..., nn.Module] | nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        num_classes: int,
        miner: nn.Module | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        head_lr_multiplier: float = 10.0,
        loss_lr: float = 1e-2,
        frozen_backbone_epochs: int = 0,
        eval_ks: Sequence[int] = (1, 2, 4, 8),
        eval_metrics: Sequence[str] = ("recall", "map@r", "r_precision"),
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = embedder
        self.loss = build_loss(loss, num_classes, embedder.embedding_dim)
        self.miner = miner
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.head_lr_multiplier = head_lr_multiplier
        self.loss_lr = loss_lr
        self.frozen_backbone_epochs = frozen_backbone_epochs
        self.eval_ks = tuple(eval_ks)
        self.eval_metrics = tuple(eval_metrics)
        self.run_config = run_config or {}
        self._outputs: list[dict[str, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @property
    def backbone_frozen(self) -> bool:
        return self.current_epoch < self.frozen_backbone_epochs

    def on_train_epoch_start(self) -> None:
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)
        if self.backbone_frozen:
            self.model.backbone.eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        embeddings = self.model(batch["image"], backbone_grad=not self.backbone_frozen)
        loss = compute_loss(self.loss, self.miner, embeddings, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(embeddings))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._outputs.append(
            {
                "embedding": self.model(batch["image"]),
                # integers only: collective ops of some backends reject bool tensors
                **{k: batch[k].long() for k in ("label", "index", "is_query", "is_gallery")},
            }
        )

    def on_validation_epoch_end(self) -> None:
        gathered = self._gather(self._outputs)
        self._outputs = []
        result, _, _ = evaluate_protocol(
            gathered["embedding"],
            gathered["label"],
            gathered["is_query"],
            gathered["is_gallery"],
            ks=self.eval_ks,
            metrics=self.eval_metrics,
        )
        for name, value in result.metrics.items():
            # every rank holds the same gathered result, so no reduction is needed
            self.log(f"val/{name}", value, prog_bar=name == "recall@1", sync_dist=False)
        # queries whose label has no other image cannot be scored and are left out
        self.log("val/excluded_queries", float(result.num_excluded), sync_dist=False)

    def _gather(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
        """Concatenate this rank's outputs, gather all ranks', and keep one copy of each dataset
        item in dataset order (distributed samplers pad with duplicates)."""
        local = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        if self.trainer.world_size > 1:
            gathered: dict[str, torch.Tensor] = self.all_gather(local)  # type: ignore[assignment]
            local = {k: v.flatten(0, 1) for k, v in gathered.items()}
        arrays = {
            k: v.detach().float().cpu().numpy() if k == "embedding" else v.cpu().numpy()
            for k, v in local.items()
        }
        _, first = np.unique(arrays["index"], return_index=True)
        order = first[np.argsort(arrays["index"][first])]
        return {k: v[order] for k, v in arrays.items()}

    def configure_optimizers(self) -> Any:
        base_lr = float(self.optimizer_factory.keywords["lr"])  # type: ignore[attr-defined]
        groups = [
            {"params": self.model.backbone_parameters(), "lr": base_lr, "name": "backbone"},
            {
                "params": self.model.head_parameters(),
                "lr": base_lr * self.head_lr_multiplier,
                "name": "head",
            },
        ]
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": self.loss_lr, "name": "loss"})
        optimizer = self.optimizer_factory([g for g in groups if g["params"]])
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.run_config

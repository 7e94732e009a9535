"""The LightningModule: training and validation steps and optimizers. Lightning runs the loop;
the model, the losses, the index and the metrics live in their own modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from retrieval.evaluation import evaluate_protocol
from retrieval.models.embedder import Embedder
from retrieval.training.loggers import expect_eval_modules
from retrieval.training.losses import check_gatherable, compute_loss
from retrieval.training.mixing import InstanceMix, check_mixable, mixed_loss
from retrieval.training.schedules import layer_decay_groups


class RetrievalModule(pl.LightningModule):
    """Metric learning of an :class:`Embedder`.

    Args:
        embedder: the Embedder being trained.
        loss: a pytorch-metric-learning loss (a proxy loss is built for the run's number of
            training labels and embedding width: ``num_train_labels`` / ``embedding_size`` in
            ``conf/train.yaml``, which ``train.py`` measures).
        miner: an optional pytorch-metric-learning miner.
        optimizer: partial constructor taking the parameter groups.
        scheduler: partial constructor taking ``(optimizer, total_steps=...)``; stepped every
            optimizer step.
        head_lr_multiplier: learning rate of pooling and head relative to the backbone's.
        loss_lr: learning rate of the loss's own parameters (proxies, class weights).
        frozen_backbone_epochs: epochs at the start during which only the head and the loss
            parameters train (the backbone runs in eval mode without gradients).
        layer_decay: layer-wise learning-rate decay of a ViT backbone (e.g. 0.75): block ``i``
            of L trains at ``lr * layer_decay ** (L - i)``, the patch embedding at
            ``lr * layer_decay ** (L + 1)`` (see
            :func:`retrieval.training.schedules.layer_decay_groups`);
            ``None``: one learning rate for the whole backbone. Other backbones raise ValueError.
        eval_ks: the k of recall@k reported by validation.
        eval_metrics: metric families validation reports (see
            :func:`retrieval.evaluation.evaluate_embeddings`).
        mix: mixup / CutMix of instances (:class:`~retrieval.training.mixing.InstanceMix`),
            trained with :func:`~retrieval.training.mixing.soft_ntxent` at the temperature of
            ``loss``, which must then be pytorch-metric-learning's ``NTXentLoss``.
        gather_embeddings: under distributed training, compute the loss and the miner over the
            embeddings and labels of every rank (the global batch) instead of this rank's batch
            alone; only for parameter-free PML losses (see
            :func:`retrieval.training.losses.compute_loss`).
        run_config: plain dict stored in checkpoints so a run can be rebuilt from them.
    """

    def __init__(
        self,
        embedder: Embedder,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        miner: nn.Module | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        head_lr_multiplier: float = 10.0,
        loss_lr: float = 1e-2,
        frozen_backbone_epochs: int = 0,
        layer_decay: float | None = None,
        eval_ks: Sequence[int] = (1, 2, 4, 8),
        eval_metrics: Sequence[str] = ("recall", "map@r", "r_precision"),
        gather_embeddings: bool = False,
        mix: InstanceMix | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = embedder
        self.loss = loss
        self.miner = miner
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.head_lr_multiplier = head_lr_multiplier
        self.loss_lr = loss_lr
        self.frozen_backbone_epochs = frozen_backbone_epochs
        self.layer_decay = layer_decay
        self.eval_ks = tuple(eval_ks)
        self.eval_metrics = tuple(eval_metrics)
        self.gather_embeddings = gather_embeddings
        if gather_embeddings:
            check_gatherable(self.loss, miner)  # fail before training, not at its first step
        self.mix = mix
        if mix is not None:
            _check_mixable(loss, miner, gather_embeddings)
        self.run_config = run_config or {}
        self._outputs: list[dict[str, torch.Tensor]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @property
    def backbone_frozen(self) -> bool:
        return self.current_epoch < self.frozen_backbone_epochs

    def on_fit_start(self) -> None:
        in_eval = [m for _, m in self.named_modules() if not m.training]
        if in_eval and {id(m) for m in in_eval} <= {id(m) for m in self.model.frozen_modules()}:
            expect_eval_modules(len(in_eval))  # the frozen norms, in eval mode by design
        wrapped = self.trainer.strategy.model
        if (
            self.frozen_backbone_epochs > 0
            and isinstance(wrapped, DistributedDataParallel)
            and not wrapped.find_unused_parameters
        ):
            raise ValueError(
                f"model.frozen_backbone_epochs={self.frozen_backbone_epochs} leaves the backbone "
                "without gradients, which DDP refuses unless it looks for unused parameters: "
                "add trainer.strategy=ddp_find_unused_parameters_true"
            )

    def on_train_epoch_start(self) -> None:
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)
        if self.backbone_frozen:
            self.model.backbone.eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, shares = batch["image"], None
        if self.mix is not None:
            images, shares = self.mix(images, batch.get("view"))
        embeddings = self.model(images, backbone_grad=not self.backbone_frozen)
        if shares is not None:
            loss = mixed_loss(self.loss, embeddings, batch["label"], shares)
        else:
            loss = compute_loss(
                self.loss, self.miner, embeddings, batch["label"], gather=self.gather_embeddings
            )
        # a gathered loss comes back multiplied by the world size (see compute_loss)
        scale = self.trainer.world_size if self.gather_embeddings else 1
        self.log("train/loss", loss.detach() / scale, prog_bar=True, batch_size=len(embeddings))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._outputs.append(
            {
                # float32 whatever the precision: every rank gathers the same dtype
                "embedding": self.model(batch["image"]).float(),
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
        # Every rank scores the same gathered set, so every rank has the same values; "max" over
        # equal values returns them exactly (a mean could round), and syncing at all keeps
        # Lightning from warning that epoch-level values are not synced.
        values = {**result.metrics, "excluded_queries": float(result.num_excluded)}
        # excluded_queries: queries whose label has no other image cannot be scored
        for name, value in values.items():
            self.log(
                f"val/{name}", value, prog_bar=name == "recall@1", sync_dist=True, reduce_fx="max"
            )

    def _gather(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
        """Every rank's validation outputs, one row per dataset item in dataset order:
        ``embedding`` (N, D) float32, ``label``, ``index``, ``is_query``, ``is_gallery`` (N,)
        int64, N the size of the validation set (``DistributedSampler``'s repeats dropped)."""
        local = self._concat(outputs)
        if self.trainer.world_size > 1:
            local = gather_rows(local, self.all_gather)
        arrays = {k: v.detach().cpu().numpy() for k, v in local.items()}
        if len(arrays["index"]) == 0:
            raise ValueError("validation produced no embeddings: the validation set is empty")
        return unique_by_index(arrays)

    def _concat(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This rank's outputs as one tensor per key; empty (0, ...) tensors when it has none."""
        if outputs:
            return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        none = torch.zeros(0, dtype=torch.long, device=self.device)
        empty = torch.zeros(0, self.model.embedding_dim, device=self.device)
        return {
            "embedding": empty,
            **{k: none for k in ("label", "index", "is_query", "is_gallery")},
        }

    def configure_optimizers(self) -> Any:
        base_lr = float(self.optimizer_factory.keywords["lr"])  # type: ignore[attr-defined]
        groups = [
            *self._backbone_groups(base_lr),
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

    def _backbone_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """One group at ``base_lr``, or one per ViT depth under ``layer_decay``."""
        if self.layer_decay is None:
            return [{"params": self.model.backbone_parameters(), "lr": base_lr, "name": "backbone"}]
        backbone = self.model.backbone
        try:
            return layer_decay_groups(backbone.net, base_lr, self.layer_decay)
        except ValueError as err:
            raise ValueError(f"backbone '{backbone.name}': {err}") from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.run_config


def gather_rows(
    local: dict[str, torch.Tensor], all_gather: Callable[[Any], Any]
) -> dict[str, torch.Tensor]:
    """Concatenate every rank's rows, in rank order, when ranks hold different numbers of them.

    Args:
        local: this rank's tensors (n_r, ...), all with the same n_r, possibly 0; the trailing
            shapes and dtypes must be the same on every rank.
        all_gather: a collective (``LightningModule.all_gather``) mapping a dict of tensors
            (n, ...) with the same n on every rank to a dict of tensors (W, n, ...).
    Returns:
        the same keys with sum(n_r) rows. ``all_gather`` needs equal shapes, so rows are padded
        with zeros to the largest n_r and the padding is cut off again.
    """
    key = next(iter(local))
    count = torch.tensor([len(local[key])], device=local[key].device)
    counts = [int(c) for c in all_gather({"n": count})["n"].flatten()]
    most = max(counts)
    padded = {
        k: torch.cat([v, v.new_zeros((most - len(v), *v.shape[1:]))]) for k, v in local.items()
    }
    gathered = all_gather(padded)
    return {k: torch.cat([v[r, :n] for r, n in enumerate(counts)]) for k, v in gathered.items()}


def unique_by_index(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the first row of each distinct ``arrays["index"]`` value, sorted by it.

    Args:
        arrays: equal-length arrays (N, ...) including ``index`` (N,), the dataset index of each
            row; repeated indices (sampler padding) must carry identical rows.
    Returns:
        the same keys with M <= N rows, ``index`` strictly increasing.
    """
    _, first = np.unique(arrays["index"], return_index=True)
    return {k: v[first] for k, v in arrays.items()}


def _check_mixable(loss: nn.Module, miner: nn.Module | None, gather: bool) -> None:
    """Raise ``ValueError`` unless mixup / CutMix of instances can train with this loss: mixed
    views need soft targets, which :func:`soft_ntxent` gives NT-Xent only."""
    check_mixable(loss)
    if miner is not None or gather:
        raise ValueError(
            "model.mix scores every pair of the batch: it needs miner=none and "
            "model.gather_embeddings=false"
        )

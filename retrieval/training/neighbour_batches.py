"""Hard-negative batches for instance training: batches of look-alikes, found by the model.

With P random photos in a batch, NT-Xent's negatives are mostly easy: a copy of a pyramid is
told apart from a cat and a chart, never from the other pyramids it is confused with at
search time. SSCD answers with batches of thousands of images; on a CPU a batch is 64. This
callback instead embeds the training images (evaluation transform, no augmentation) with the
model being trained at the start of each epoch, finds each image's nearest neighbours, and
hands them to :class:`~retrieval.data.sampler.InstanceBatchSampler`, whose batches then hold
groups of neighbours. Every image is still its own label: the neighbours are negatives.

Near-identical images of different labels in the pool (the same picture twice) become
negatives that no edit can separate; ``max_similarity`` leaves out neighbours that close.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import numpy as np

from retrieval.data.dataset import eval_loader
from retrieval.data.sampler import InstanceBatchSampler
from retrieval.infra.ties import top_k_columns
from retrieval.models.extract import embed_loader
from retrieval.postprocess.steps import normalize_rows


def nearest_neighbours(
    vectors: np.ndarray, k: int, max_similarity: float = 1.0, chunk: int = 1024
) -> np.ndarray:
    """Each row's ``k`` nearest other rows by cosine similarity, nearest first (equal scores
    by ascending index), leaving out rows more similar than ``max_similarity``; (N, k) int64.
    A row with fewer than ``k`` such neighbours repeats its last one (or is its own only
    "neighbour" when none is left, which the sampler skips)."""
    unit = normalize_rows(vectors)
    n = len(unit)
    k = min(k, n - 1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        scores = unit[rows] @ unit.T
        scores[np.arange(len(rows)), rows] = -np.inf  # never itself
        scores[scores > max_similarity] = -np.inf
        found = top_k_columns(scores, k)
        usable = np.take_along_axis(scores, found, axis=1) > -np.inf
        for i, (row, ok) in enumerate(zip(found, usable, strict=True)):
            kept = row[ok]
            out[start + i] = kept[np.minimum(np.arange(k), len(kept) - 1)] if len(kept) else rows[i]
    return out


class NeighbourBatches(pl.Callback):
    """At each training epoch's start, batches of ``group_size`` look-alikes (see module doc).

    Args:
        group_size: images of one group in a batch: an image and ``group_size - 1`` of its
            neighbours (the batch's P images are P / group_size groups).
        neighbours: how many nearest neighbours of each image the group's others are drawn
            from (more: easier negatives and more variety).
        max_similarity: neighbours more similar than this (cosine) are left out as likely
            duplicates of the image; 1.0 keeps all.
        batch_size: images per embedding batch.
    """

    def __init__(
        self,
        group_size: int = 4,
        neighbours: int = 16,
        max_similarity: float = 1.0,
        batch_size: int = 64,
    ) -> None:
        if group_size < 2 or neighbours < group_size - 1:
            raise ValueError(
                f"callbacks.neighbour_batches needs group_size >= 2 and neighbours >= "
                f"group_size - 1, got group_size={group_size}, neighbours={neighbours}"
            )
        self.group_size, self.neighbours = group_size, neighbours
        self.max_similarity, self.batch_size = max_similarity, batch_size

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if not isinstance(sampler, InstanceBatchSampler):
            raise ValueError(
                "callbacks.neighbour_batches builds instance-training batches: it needs "
                f"sampler=instance, not {type(sampler).__name__}"
            )
        started = time.perf_counter()
        vectors = self._embed_training_images(trainer, pl_module)
        if len(vectors) != sampler.num_images:
            raise ValueError(
                f"the training split embedded to {len(vectors)} images, the sampler holds "
                f"{sampler.num_images}"
            )
        found = nearest_neighbours(vectors, self.neighbours, self.max_similarity)
        sampler.use_neighbours(found, self.group_size)
        if trainer.is_global_zero:
            print(
                f"batches of neighbours: {len(vectors)} training images embedded, groups of "
                f"{self.group_size} from each image's {found.shape[1]} nearest, "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )

    def _embed_training_images(self, trainer: pl.Trainer, module: Any) -> np.ndarray:
        """The training split as the model embeds it now (evaluation transform, in order);
        the module's train/eval modes are restored afterwards."""
        datamodule: Any = getattr(trainer, "datamodule")  # noqa: B009 - not in its stubs
        dataset = datamodule.split_eval_set(datamodule.splits[0])
        loader = eval_loader(dataset, self.batch_size, datamodule.num_workers)
        training = module.training
        found = embed_loader(
            module.model, loader, device=module.device, progress=False, description="neighbours"
        )
        module.train(training)
        return found.vectors

"""P x K batch sampling: every batch holds P labels with K images each, or (instance
training) P images with K views each.

Metric-learning losses need positives in the batch; drawing P labels and K images of each
guarantees them. Labels with fewer than K images are drawn with replacement inside the label
(documented behaviour, so K stays fixed); labels with a single image give no positive pair and
are left out of training with a warning.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def instance_batches(images: int, wanted: int = 32) -> str:
    """The instance-training overrides a split of ``images`` images can fill: every image its
    own label, at most ``wanted`` of them per batch (at least 2 images needed)."""
    if images < 2:
        return f"the split has {images} image(s): add images (instance training needs 2)"
    return f"use sampler=instance sampler.images_per_batch={min(wanted, images)}"


def fitting_sampler(sizes: Sequence[int], samples_per_label: int, images: int = 0) -> str:
    """What to set for a split whose labels have ``sizes`` images (only labels with >= 2) of
    ``images`` in all: the most labels a batch can hold (>= 2), with ``samples_per_label``
    lowered until that many labels have at least as many images. E.g. ``this split has 10
    labels with >= 4 images; use sampler.labels_per_batch=10 sampler.samples_per_label=4``;
    with fewer than 2 such labels, instance training (:func:`instance_batches`)."""
    if len(sizes) < 2:
        return (
            "P x K batches need at least 2 labels with 2 or more images each; add images, or "
            f"train every image as its own label: {instance_batches(images)}"
        )
    k = max(2, samples_per_label)
    while k > 2 and sum(n >= k for n in sizes) < 2:
        k -= 1
    labels = sum(n >= k for n in sizes)
    return (
        f"this split has {labels} labels with >= {k} images; use "
        f"sampler.labels_per_batch={labels} sampler.samples_per_label={k}"
    )


class _EpochBatches(Sampler[list[int]]):
    """What both samplers share: P x K batches, ``batches_per_rank`` per epoch, seeded by
    (``seed``, epoch), every ``num_replicas``-th global batch taken from ``rank``."""

    def _setup(self, p: int, k: int, total: int, seed: int, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.p, self.k = p, k
        self.batches_per_rank = max(1, total // num_replicas)
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank

    def _steps(self) -> range:
        """Global batch numbers of one epoch (this rank yields those ``% num_replicas == rank``)."""
        return range(self.batches_per_rank * self.num_replicas)


class PKBatchSampler(_EpochBatches):
    """Yields batches of dataset indices: ``labels_per_batch`` labels x ``samples_per_label``.

    Deterministic for a given ``seed`` and epoch (call :meth:`set_epoch` before each epoch).
    Under distributed training every rank builds the same global sequence of batches and takes
    every ``num_replicas``-th one from ``rank``, so ranks see different batches and the same
    number of them.

    Args:
        labels: label of each dataset item (any hashable values), length N.
        labels_per_batch: P, distinct labels per batch.
        samples_per_label: K, items per label in a batch.
        batches_per_epoch: global batches per epoch; default ``N // (P * K)``.
        batch_size: alternative to P: must be a multiple of K, and P = batch_size / K.
    """

    def __init__(
        self,
        labels: Sequence[object],
        labels_per_batch: int = 8,
        samples_per_label: int = 4,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int | None = None,
    ) -> None:
        if batch_size is not None:
            if batch_size % samples_per_label:
                raise ValueError(
                    f"sampler.batch_size={batch_size} cannot be filled by "
                    f"samples_per_label={samples_per_label} images per label: "
                    "make it a multiple of samples_per_label"
                )
            labels_per_batch = batch_size // samples_per_label
        if labels_per_batch < 2 or samples_per_label < 2:
            raise ValueError(
                "sampler needs labels_per_batch >= 2 and samples_per_label >= 2 "
                f"(got P={labels_per_batch}, K={samples_per_label})"
            )
        _, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
        groups = [np.flatnonzero(inverse == c) for c in range(inverse.max(initial=-1) + 1)]
        singles = sum(len(g) == 1 for g in groups)
        self.groups = [g for g in groups if len(g) >= 2]
        if singles:
            warnings.warn(
                f"sampler: {singles} labels have a single image and are left out of "
                "training (they give no positive pair)",
                stacklevel=2,
            )
        if len(self.groups) < labels_per_batch:
            raise ValueError(
                f"sampler needs labels_per_batch={labels_per_batch} labels with at least 2 "
                f"images, but the training split has {len(self.groups)}; "
                + fitting_sampler([len(g) for g in self.groups], samples_per_label, len(labels))
            )
        total = batches_per_epoch or len(labels) // (labels_per_batch * samples_per_label)
        self._setup(labels_per_batch, samples_per_label, total, seed, num_replicas, rank)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues: list[list[int]] = [[] for _ in self.groups]
        for step in self._steps():
            chosen = rng.choice(len(self.groups), size=self.p, replace=False)
            batch = [i for c in chosen for i in self._take(rng, queues, int(c))]
            if step % self.num_replicas == self.rank:
                yield batch

    def _take(self, rng: np.random.Generator, queues: list[list[int]], c: int) -> list[int]:
        """K items of label ``c``: without replacement while the label has K left in its
        shuffled queue (refilled when exhausted), with replacement if it has fewer than K."""
        group = self.groups[c]
        if len(group) < self.k:
            return [int(i) for i in rng.choice(group, size=self.k, replace=True)]
        if len(queues[c]) < self.k:
            queues[c] = [int(i) for i in rng.permutation(group)]
        taken, queues[c] = queues[c][: self.k], queues[c][self.k :]
        return taken


class InstanceBatchSampler(_EpochBatches):
    """Instance discrimination batches: ``images_per_batch`` distinct dataset indices (P), each
    repeated ``views_per_image`` times (K) in a row, so a batch is ``[i0]*K + [i1]*K + ...``.

    The dataset's random train transform turns the K copies of an index into K different views
    of the same image; a contrastive loss (NT-Xent) then pulls the views together and pushes
    the other images away. The loss receives ``batch["label"]``, the dataset's label of each
    item, as the instance id, so the dataset must give every training image its own label (the
    copy-detection manifest does). With shared labels, different images of one label in a batch
    also count as positives (supervised contrastive learning).

    Each epoch visits the images in a permutation seeded by ``seed`` and the epoch (call
    :meth:`set_epoch`), ``P`` at a time: ``N // P`` global batches by default, the last
    ``N % P`` images of the permutation left out (different ones every epoch). A longer epoch
    (``batches_per_epoch``) continues with fresh permutations; a batch never holds an index
    twice except as its K views. Distributed ranks take every ``num_replicas``-th global batch
    from ``rank``, so they see different images and the same number of batches.

    Hard-negative batches (:meth:`use_neighbours`, set by
    :class:`~retrieval.training.neighbour_batches.NeighbourBatches`): a batch is then groups of
    ``group_size`` images, each group one image of the permutation and ``group_size - 1`` drawn
    at random from its nearest neighbours in the model's own embedding space, so the images a
    view must be told apart from are the look-alikes a copy detector confuses, not P random
    photos. The permutation still decides which images lead the groups.

    Args:
        labels: label of each dataset item, length N; only its length is used.
        images_per_batch: P, distinct images per batch (at most N).
        views_per_image: K >= 2, views of each image in a batch.
        batches_per_epoch: global batches per epoch; default ``N // P``.
        numbered_views: yield ``(index, view)`` pairs, view 0 .. K-1, instead of the index K
            times, for a dataset that gives each view its own transform
            (:class:`~retrieval.data.dataset.ImageDataset` ``view_transforms``).
    """

    def __init__(
        self,
        labels: Sequence[object],
        images_per_batch: int = 32,
        views_per_image: int = 2,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        numbered_views: bool = False,
    ) -> None:
        self.numbered_views = numbered_views
        if images_per_batch < 2 or views_per_image < 2:
            raise ValueError(
                "sampler needs images_per_batch >= 2 and views_per_image >= 2 "
                f"(got P={images_per_batch}, K={views_per_image})"
            )
        self.num_images = len(labels)
        if self.num_images < images_per_batch:
            raise ValueError(
                f"sampler.images_per_batch={images_per_batch} distinct images per batch, but "
                f"the training split has {self.num_images}; "
                + (
                    f"use sampler.images_per_batch={self.num_images}, or add training images"
                    if self.num_images >= 2
                    else "add training images (instance training needs 2)"
                )
            )
        total = batches_per_epoch or self.num_images // images_per_batch
        self._setup(images_per_batch, views_per_image, total, seed, num_replicas, rank)
        self.neighbours: np.ndarray | None = None
        self.group_size = 1

    def use_neighbours(self, neighbours: np.ndarray | None, group_size: int) -> None:
        """Build the next epochs' batches from groups: each image of the permutation with
        ``group_size - 1`` images drawn from its row of ``neighbours`` ((N, m) dataset indices,
        nearest first, never the image itself); ``None`` returns to plain random batches."""
        if neighbours is not None:
            neighbours = np.asarray(neighbours, dtype=np.int64)
            if neighbours.ndim != 2 or len(neighbours) != self.num_images:
                raise ValueError(
                    f"neighbours must be ({self.num_images}, m) dataset indices, "
                    f"got shape {neighbours.shape}"
                )
            if not 2 <= group_size <= min(self.p, neighbours.shape[1] + 1):
                raise ValueError(
                    f"group_size must be 2..{min(self.p, neighbours.shape[1] + 1)} (the batch's "
                    f"{self.p} images, {neighbours.shape[1]} neighbours each), got {group_size}"
                )
        self.neighbours, self.group_size = neighbours, group_size

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self._random(rng) if self.neighbours is None else self._grouped(rng)
        for step in self._steps():
            chosen = next(batches)  # every rank draws every batch: one stream for all
            if step % self.num_replicas == self.rank:
                if self.numbered_views:
                    yield [(i, v) for i in chosen for v in range(self.k)]  # type: ignore[misc]
                else:
                    yield [i for i in chosen for _ in range(self.k)]

    def _random(self, rng: np.random.Generator) -> Iterator[list[int]]:
        """P images at a time from fresh permutations, the last N % P of each left out."""
        while True:
            order = rng.permutation(self.num_images)
            for start in range(0, self.num_images - self.p + 1, self.p):
                yield [int(i) for i in order[start : start + self.p]]

    def _grouped(self, rng: np.random.Generator) -> Iterator[list[int]]:
        """P distinct images in groups: a leader from the permutations, then its neighbours
        not yet in the batch, drawn at random, up to ``group_size`` images a group."""
        assert self.neighbours is not None
        leaders = (int(i) for _ in itertools.count() for i in rng.permutation(self.num_images))
        while True:
            chosen: list[int] = []
            while len(chosen) < self.p:
                leader = next(leaders)
                if leader in chosen:
                    continue
                room = min(self.group_size, self.p - len(chosen)) - 1
                drawn = [int(j) for j in rng.permutation(self.neighbours[leader])]
                mates = [j for j in dict.fromkeys(drawn) if j != leader and j not in chosen]
                chosen += [leader, *mates[:room]]
            yield chosen


class ShapeBatchSampler(Sampler[list[int]]):
    """Evaluation batches whose images all have one shape, for a transform whose output shape
    depends on the image (``resize_mode=short`` keeps the aspect): a batch must be one tensor.

    Indices are grouped by ``shapes[i]``; each group is cut into batches of at most
    ``batch_size`` in ascending index order, and the batches are yielded by their first index,
    so a set of images in few shapes comes in nearly dataset order. Every index of
    ``indices`` (default: all) is yielded exactly once; results keep each item's ``index``,
    so callers put them back in order.
    """

    def __init__(
        self,
        shapes: Sequence[object],
        batch_size: int,
        indices: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups: dict[object, list[int]] = {}
        for i in range(len(shapes)) if indices is None else indices:
            groups.setdefault(shapes[i], []).append(int(i))
        batches = [
            members[start : start + batch_size]
            for members in groups.values()
            for start in range(0, len(members), batch_size)
        ]
        self.batches = sorted(batches, key=lambda batch: batch[0])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

"""The LightningDataModule: manifest -> checked rows -> datasets -> P x K / eval loaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

from retrieval.data.copy_edits import load_overlays
from retrieval.data.dataset import EditedCopies, ImageDataset, eval_loader
from retrieval.data.images import DEFAULT_MAX_PIXELS, find_unreadable, report_unreadable
from retrieval.data.manifest import ManifestRow, has_match, read_manifest, select_split
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.sampler import InstanceBatchSampler, PKBatchSampler
from retrieval.data.transforms import anchor_transform, eval_transform, train_transform
from retrieval.infra.hardware import loader_workers


class RetrievalDataModule(pl.LightningDataModule):
    """Training on ``train_split`` with P x K batches; validation on the held-out ``val_split``.

    Args:
        manifest: CSV manifest (see data/README.md).
        root: folder that relative manifest paths start from (default: the manifest's folder).
        preprocessing: the backbone's preprocessing; ``image_size`` overrides its input size and
            ``resize_mode`` its resize policy (``crop`` | ``squash`` | ``pad``, see
            :class:`~retrieval.data.preprocessing.Preprocessing`; ``None`` keeps the backbone's).
        train_image_size: the side training views are cut to, when smaller than the size the
            model is validated and exported at (``None``: ``image_size``). Training at a lower
            resolution costs about the square of the ratio less per step, and a network trained
            on random crops sees the whole image larger at test time, which a larger test
            input matches (Touvron et al., "Fixing the train-test resolution discrepancy").
        sampler: builds the batch sampler from ``labels``, ``seed``, ``num_replicas``, ``rank``;
            ``None`` when the module only evaluates.
        max_labels: keep only the first N labels (sorted) of each split, for quick runs.
        strict_images: unreadable images are an error instead of being skipped with a warning.
        num_workers: data-loading processes; ``None``: one per usable core, at most 4
            (:func:`~retrieval.infra.hardware.loader_workers`).
        eval_ks: the k of Recall@k that papers report on this dataset.
        augment: training augmentation, ``standard`` or ``copydetect`` (copy-detection edits
            before the crop, see :func:`~retrieval.data.transforms.train_transform`);
            ``train_scale`` ``None`` takes that augmentation's crop scale.
        num_edits, edit_p: ``copydetect``: how many edits a view gets (fewest, most) and how
            often.
        anchor_view: instance training (``sampler=instance``) with the first view of each
            image plain (:func:`~retrieval.data.transforms.anchor_transform`: a light crop of
            the whole image) and the others edited, as a copy is searched among originals.
        overlay_dir: folder of RGBA images the ``copydetect`` emoji edit pastes (default: it
            draws shapes).
    """

    def __init__(
        self,
        manifest: str | Path,
        preprocessing: Preprocessing,
        sampler: Callable[..., PKBatchSampler | InstanceBatchSampler] | None = None,
        root: str | Path | None = None,
        image_size: int | None = None,
        resize_mode: str | None = None,
        train_image_size: int | None = None,
        train_split: str = "train",
        val_split: str = "test",
        eval_batch_size: int = 64,
        num_workers: int | None = None,
        strict_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        train_scale: Sequence[float] | None = None,
        hflip: bool = True,
        color_jitter: float = 0.0,
        max_labels: int | None = None,
        seed: int = 0,
        eval_ks: Sequence[int] = (1, 2, 4, 8),
        augment: str = "standard",
        overlay_dir: str | Path | None = None,
        num_edits: Sequence[int] = (1, 3),
        edit_p: float = 0.9,
        anchor_view: bool = False,
    ) -> None:
        super().__init__()
        self.manifest = Path(manifest)
        self.root = Path(root) if root is not None else None
        self.preprocessing = preprocessing.with_size(image_size, resize_mode)
        self.train_preprocessing = self.preprocessing.with_size(train_image_size)
        self.sampler_factory = sampler
        self.splits = (train_split, val_split)
        self.eval_batch_size = eval_batch_size
        self.num_workers = loader_workers(num_workers)
        self.strict_images = strict_images
        self.max_pixels = max_pixels
        self.train_scale = tuple(train_scale) if train_scale is not None else None
        self.hflip, self.color_jitter = hflip, color_jitter
        self.augment, self.overlay_dir = augment, overlay_dir
        self.num_edits, self.edit_p = tuple(num_edits), float(edit_p)
        self.anchor_view = anchor_view
        self.max_labels = max_labels
        self.seed = seed
        self.eval_ks = tuple(eval_ks)
        self.train_set: ImageDataset | None = None
        self.val_set: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and check everything a stage needs before it starts; idempotent. Stages other
        than ``fit`` (``validate``, ``test``, ``predict``) read only the evaluation split."""
        training = stage in (None, "fit")
        if self.val_set is not None and (self.train_set is not None or not training):
            return
        rows = read_manifest(self.manifest, self.root)
        if self.val_set is None:
            val_rows = self._rows(rows, self.splits[1])
            self.val_set = ImageDataset(
                val_rows, eval_transform(self.preprocessing), self.max_pixels
            )
        if training:
            # training validates on the evaluation split: it must hold a search to score
            problems = [] if has_match(self.val_set.rows) else [self._no_match(rows)]
            train_rows = self._rows(rows, self.splits[0])
            augment = train_transform(
                self.train_preprocessing,
                self.train_scale,
                self.hflip,
                self.color_jitter,
                augment=self.augment,
                overlay_dir=self.overlay_dir,
                num_edits=self.num_edits,
                edit_p=self.edit_p,
            )
            anchor = anchor_transform(self.train_preprocessing)
            views = [anchor, augment] if self.anchor_view else []
            self.train_set = ImageDataset(train_rows, augment, self.max_pixels, views)
            try:  # fail now on a batch shape the data cannot fill
                self._sampler(rank=0, num_replicas=1)
            except ValueError as err:
                problems.insert(0, str(err))
            if problems:  # what the data lacks, all at once, each with the setting that works
                raise ValueError("; and ".join(problems))

    def _no_match(self, rows: list[ManifestRow]) -> str:
        """Why the evaluation split cannot be scored, and the split to validate on instead."""
        split, train = self.splits[1], self.splits[0]
        held = self.val_set.rows if self.val_set is not None else []
        fix = (
            f"validate on the training images with +data.val_split={train} (it scores how "
            "training fits, not how it generalises), or add images"
            if split != train and has_match(self._rows(rows, train))
            else "add images: at least 2 of one label"
        )
        return (
            f"no image of the validation split '{split}' ({len(held)} images) has another of "
            f"its label to be found, so no search can be scored; {fix}"
        )

    def _rows(self, rows: list[ManifestRow], split: str) -> list[ManifestRow]:
        selected = select_split(rows, split, str(self.manifest))
        if self.max_labels is not None:
            keep = set(sorted({r.label for r in selected})[: self.max_labels])
            selected = [r for r in selected if r.label in keep]
        bad = find_unreadable([r.path for r in selected], self.max_pixels)
        report_unreadable(
            bad, len(selected), self.strict_images, f"split '{split}' of {self.manifest}"
        )
        skipped = {b.path for b in bad}
        return [r for r in selected if r.path not in skipped]

    @property
    def num_train_labels(self) -> int:
        self.setup()
        assert self.train_set is not None
        return len(self.train_set.label_names)

    def _sampler(self, rank: int, num_replicas: int) -> PKBatchSampler | InstanceBatchSampler:
        assert self.train_set is not None
        if self.sampler_factory is None:
            raise ValueError("this data module has no sampler: pass sampler= to train with it")
        kind = getattr(self.sampler_factory, "func", self.sampler_factory)
        if self.anchor_view and not (
            isinstance(kind, type) and issubclass(kind, InstanceBatchSampler)
        ):
            raise ValueError(
                "data.anchor_view=true gives the views of one image different transforms: it "
                "needs sampler=instance"
            )
        numbered = {"numbered_views": True} if self.anchor_view else {}
        return self.sampler_factory(
            labels=self.train_set.labels,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            **numbered,
        )

    def _loaded(self) -> tuple[ImageDataset, ImageDataset]:
        self.setup()
        assert self.train_set is not None and self.val_set is not None
        return self.train_set, self.val_set

    def _rank(self) -> tuple[int, int]:
        """``(global rank, world size)`` of the attached trainer; ``(0, 1)`` without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._loaded()[0],
            batch_sampler=self._sampler(*self._rank()),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def eval_set(self) -> ImageDataset:
        """The evaluation split (``val_split``) as a dataset, without reading the training split."""
        self.setup("validate")
        assert self.val_set is not None
        return self.val_set

    def split_eval_set(self, split: str, edited: bool = False) -> ImageDataset:
        """Any split with the evaluation transform (no augmentation): what search-time steps
        such as whitening are fitted on (``split="train"``). ``edited``: each image after
        seeded copy edits (:class:`~retrieval.data.dataset.EditedCopies`, with this data's
        overlay images), the other half of the pairs ``whiten.method=edits`` learns from."""
        rows = self._rows(read_manifest(self.manifest, self.root), split)
        transform = eval_transform(self.preprocessing)
        if not edited:
            return ImageDataset(rows, transform, self.max_pixels)
        overlays = load_overlays(self.overlay_dir) if self.overlay_dir is not None else []
        side = 2 * self.preprocessing.input_size
        return EditedCopies(rows, transform, side, seed=self.seed, overlays=overlays)

    def val_dataloader(self) -> DataLoader:
        """The evaluation split in order; under distributed training each rank loads its shard.

        Shards come from ``DistributedSampler(shuffle=False)``: rank r of W takes items r, r + W,
        ..., the split padded with its first items to a multiple of W, so every rank holds
        ceil(N / W) items (at least one) and the same number of batches of the same sizes. The
        module gathers the shards and drops the padding (see ``RetrievalModule._gather``)."""
        rank, world = self._rank()
        dataset = self.eval_set()
        indices: list[int] | None = None
        if world > 1:
            indices = list(DistributedSampler(dataset, world, rank, shuffle=False))
        return eval_loader(
            dataset,
            self.eval_batch_size,
            self.num_workers,
            indices=indices,
            persistent_workers=True,
        )

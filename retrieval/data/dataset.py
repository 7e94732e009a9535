"""A map-style dataset over manifest rows, and the loader evaluation embeds it with."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, displayed_size, open_rgb
from retrieval.data.manifest import ManifestRow
from retrieval.data.sampler import ShapeBatchSampler


class ImageDataset(Dataset):
    """Items ``{"image": (3, H, W) float tensor, "label": int, "index": int, "is_query": bool,
    "is_gallery": bool}``. With ``view_transforms``, item ``(index, view)`` is the image
    through the view's own transform (the first view of an instance batch plain, the others
    edited: :class:`~retrieval.data.sampler.InstanceBatchSampler` ``numbered_views``), and the
    item has a ``view`` key.

    ``label`` is the position of the row's label in ``label_names`` (sorted, contiguous from 0),
    which is what classification-style losses (proxies) need. ``index`` is the row's position in
    this dataset, so gathered results can be put back in order. Rows without query / gallery flags
    count as both (leave-one-out protocol).
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        transform: Callable[[Any], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        view_transforms: Sequence[Callable[[Any], torch.Tensor]] = (),
    ) -> None:
        self.rows = list(rows)
        self.transform = transform
        self.max_pixels = max_pixels
        self.view_transforms = list(view_transforms)
        self.label_names, inverse = np.unique([r.label for r in self.rows], return_inverse=True)
        self.labels = inverse.astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``index``, or ``(index, view)``: the image through ``view_transforms[view]``
        (the last one for higher views), as instance batches with numbered views ask."""
        index, view = item if isinstance(item, tuple) else (item, None)
        transform = self.transform
        if view is not None and self.view_transforms:
            transform = self.view_transforms[min(view, len(self.view_transforms) - 1)]
        image = open_rgb(self.rows[index].path, self.max_pixels)
        numbered = {} if view is None else {"view": view}
        return {**self._item(index), **numbered, "image": transform(image)}

    def cache_description(self) -> dict[str, Any]:
        """What its embeddings depend on besides the model and preprocessing, for an embedding
        cache's key: the rows' paths and labels."""
        return {"paths": [str(r.path) for r in self.rows], "labels": [r.label for r in self.rows]}

    def _item(self, index: int) -> dict[str, Any]:
        """Everything of item ``index`` but its image."""
        row = self.rows[index]
        return {
            "label": int(self.labels[index]),
            "index": index,
            "is_query": row.is_query is not False,
            "is_gallery": row.is_gallery is not False,
        }


class EditedCopies(ImageDataset):
    """The images of ``rows``, each after ``edits`` random copy edits
    (:func:`~retrieval.data.copy_edits.apply_edit`, kinds drawn without ``combo``) seeded by
    ``(seed, index)``, then ``transform``: the edited halves of the (image, edited copy) pairs
    that ``postprocess.whiten.method=edits`` learns from. The same item always gives the same
    pixels, in any worker. Edits are drawn on a copy whose long side is at most
    ``max_side`` (the picture a model sees, at a fraction of the cost of a full photo)."""

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        transform: Callable[[Any], torch.Tensor],
        max_side: int,
        edits: tuple[int, int] = (1, 3),
        seed: int = 0,
        overlays: Sequence[Any] = (),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(rows, transform, max_pixels)
        self.max_side, self.edits, self.seed = max_side, edits, seed
        self.overlays = list(overlays)

    def cache_description(self) -> dict[str, Any]:
        """The rows and what the edits depend on: the edited copies must not be read back as
        the plain images' embeddings."""
        edited = {
            "edits": list(self.edits),
            "seed": self.seed,
            "max_side": self.max_side,
            "overlays": len(self.overlays),
        }
        return {**super().cache_description(), "edited": edited}

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        from retrieval.data.copy_edits import SINGLE_KINDS, apply_edit

        row = self.rows[index]
        image = open_rgb(row.path, self.max_pixels)
        if max(image.size) > self.max_side:
            image.thumbnail((self.max_side, self.max_side))
        rng = random.Random(f"{self.seed}:{index}")
        for kind in rng.sample(SINGLE_KINDS, rng.randint(*self.edits)):
            image = apply_edit(image, kind, rng, self.overlays)
        return {**super()._item(index), "image": self.transform(image)}


def eval_loader(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    indices: Sequence[int] | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """The loader every evaluation embeds ``dataset`` with (items of ``indices``, default all):
    batches of ``batch_size`` in order, or, when the dataset's transform gives images of
    different shapes (a step with ``output_size(width, height) -> (h, w)``, as
    ``resize_mode=short``'s), batches of one shape each (:class:`ShapeBatchSampler`), found
    from the image headers before loading. An unreadable header counts as its own shape; the
    item then fails to load as it would in order."""
    steps = getattr(dataset.transform, "transforms", [dataset.transform])
    shaper = next((step for step in steps if hasattr(step, "output_size")), None)
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": persistent_workers and num_workers > 0,
    }
    if shaper is None:
        chosen = None if indices is None else list(indices)
        return DataLoader(dataset, batch_size=batch_size, sampler=chosen, **common)
    shapes: list[object] = []
    for row in dataset.rows:
        try:
            shapes.append(shaper.output_size(*displayed_size(row.path, dataset.max_pixels)))
        except ImageLoadError:
            shapes.append(("unreadable", str(row.path)))
    return DataLoader(
        dataset, batch_sampler=ShapeBatchSampler(shapes, batch_size, indices), **common
    )

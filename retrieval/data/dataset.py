"""A map-style dataset over manifest rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from retrieval.data.images import DEFAULT_MAX_PIXELS, open_rgb
from retrieval.data.manifest import ManifestRow


class ImageDataset(Dataset):
    """Items ``{"image": (3, H, W) float tensor, "label": int, "index": int, "is_query": bool,
    "is_gallery": bool}``.

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
    ) -> None:
        self.rows = list(rows)
        self.transform = transform
        self.max_pixels = max_pixels
        self.label_names, inverse = np.unique([r.label for r in self.rows], return_inverse=True)
        self.labels = inverse.astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        image = open_rgb(row.path, self.max_pixels)
        return {
            "image": self.transform(image),
            "label": int(self.labels[index]),
            "index": index,
            "is_query": row.is_query is not False,
            "is_gallery": row.is_gallery is not False,
        }

"""What evaluate and export share about the search-time stage (``postprocess=``): embedding with
test-time augmentation, fitting the whitening on the training split, and timing the steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from retrieval.data.dataset import ImageDataset
from retrieval.models import Embedder
from retrieval.models.extract import Embeddings
from retrieval.postprocess import Postprocess, Whitening, fit_whitening

log = logging.getLogger(__name__)

EmbedFn = Callable[[Embedder, ImageDataset], Embeddings]


def postprocess_config(cfg: DictConfig) -> Postprocess:
    """The ``postprocess`` node of a task config as :class:`Postprocess` (no steps: off)."""
    node = cfg.get("postprocess")
    try:
        steps = Postprocess.from_dict(dict(node) if node is not None else None)
    except (TypeError, ValueError) as err:
        raise ValueError(f"postprocess: {err}") from err
    runtime = cfg.get("inference", {}).get("runtime", "eager")
    if steps.tta is not None and runtime != "eager":
        raise ValueError(
            f"postprocess.tta runs the PyTorch model, but inference.runtime={runtime}: "
            "use inference.runtime=eager with tta"
        )
    return steps


@dataclass
class FittedSteps:
    """The steps with what they were fitted on: ``embedder`` embeds with the TTA of
    ``steps`` (it is the task's embedder when there is none), ``whitening`` is fitted when
    ``steps.whiten`` is on and its ``fit_on`` is ``train`` (fitting on the gallery happens
    where the gallery is known)."""

    steps: Postprocess
    embedder: Embedder
    whitening: Whitening | None
    fitted_on: dict[str, Any]


def fit_steps(
    steps: Postprocess,
    embedder: Embedder,
    train_set: Callable[[], ImageDataset],
    embed: EmbedFn,
) -> FittedSteps:
    """Prepare ``steps`` for ``embedder``: its TTA copy, and the whitening fitted on the
    embeddings (with that TTA) of ``train_set()`` when ``whiten.fit_on`` is ``train``."""
    tta_embedder = embedder.with_search_steps(tta=steps.tta) if steps.tta else embedder
    whitening, fitted_on = None, {}
    if steps.whiten is not None and steps.whiten.fit_on == "train":
        dataset = train_set()
        vectors = embed(tta_embedder, dataset)
        labels = np.array([row.label for row in dataset.rows])
        whitening = fit_whitening(
            vectors.vectors,
            dim=steps.whiten.dim,
            shrinkage=steps.whiten.shrinkage,
            labels=labels,
            method=steps.whiten.method,
        )
        fitted_on = {"whiten": {"split": "train", "images": len(labels)}}
        log.info("whitening (%s) fitted on %d training images", steps.whiten.method, len(labels))
    return FittedSteps(steps, tta_embedder, whitening, fitted_on)


def ms_per_image(
    embedders: list[Embedder], dataset: ImageDataset, device: torch.device, images: int = 16
) -> list[float]:
    """Median milliseconds per image of each embedder on the first ``images`` of ``dataset``:
    one batch, 5 timed runs of each after a warm-up, the embedders taking turns (a shared
    machine's noise falls on all of them alike)."""
    count = min(images, len(dataset))
    if count == 0:
        return [float("nan")] * len(embedders)
    batch = torch.stack([dataset[i]["image"] for i in range(count)]).to(device)
    models = [e.to(device).eval() for e in embedders]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(batch)
        for _ in range(5):
            for model, spent in zip(models, times, strict=True):
                start = time.perf_counter()
                model(batch)
                spent.append(time.perf_counter() - start)
    return [1000.0 * float(np.median(t)) / count for t in times]

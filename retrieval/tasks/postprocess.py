"""What evaluate and export share about the search-time stage (``postprocess=``): embedding with
test-time augmentation, fitting the whitening on the training split (the data's own, or that
of ``data@fit_data=``), and timing the steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from retrieval.data.dataset import ImageDataset
from retrieval.models import Embedder
from retrieval.models.extract import Embeddings
from retrieval.postprocess import Postprocess, Whiten, Whitening, fit_whitening, sample_background

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


def fitting_split(cfg: DictConfig, datamodule: Any) -> Callable[[bool], ImageDataset]:
    """The training split search-time steps are fitted on, as ``train_set(edited)`` for
    :func:`fit_steps`: that of ``cfg.fit_data`` when set (a data config, ``+data@fit_data=NAME``:
    e.g. SfM-120k's 3D models for the whitening of Revisited Oxford, whose data has no training
    split), seen with the evaluated data's preprocessing; else ``datamodule``'s own."""
    source = datamodule
    if cfg.get("fit_data") is not None:
        source = instantiate(cfg.fit_data, _partial_=True)(
            preprocessing=datamodule.preprocessing, image_size=None, resize_mode=None, seed=cfg.seed
        )
    return lambda edited: source.split_eval_set(source.splits[0], edited)


@dataclass
class FittedSteps:
    """The steps with what they were fitted on: ``embedder`` embeds with the TTA of
    ``steps`` (it is the task's embedder when there is none), ``whitening`` is fitted when
    ``steps.whiten`` is on and its ``fit_on`` is ``train`` (fitting on the gallery happens
    where the gallery is known), ``background`` holds the training split's vectors (a
    sample, before whitening) that ``steps.score_norm`` compares queries with."""

    steps: Postprocess
    embedder: Embedder
    whitening: Whitening | None
    fitted_on: dict[str, Any]
    background: np.ndarray | None = None


def fit_steps(
    steps: Postprocess,
    embedder: Embedder,
    train_set: Callable[[bool], ImageDataset],
    embed: EmbedFn,
) -> FittedSteps:
    """Prepare ``steps`` for ``embedder``: its TTA copy, the whitening fitted on the
    embeddings (with that TTA) of ``train_set(False)`` when ``whiten.fit_on`` is ``train``
    (``method=edits``: with those of ``train_set(True)``, the same images edited, as pairs),
    and the score-normalisation background drawn from them."""
    tta_embedder = embedder.with_search_steps(tta=steps.tta) if steps.tta else embedder
    whiten = steps.whiten if steps.whiten is not None and steps.whiten.fit_on == "train" else None
    if whiten is None and steps.score_norm is None:
        return FittedSteps(steps, tta_embedder, None, {})
    dataset = train_set(False)
    vectors = embed(tta_embedder, dataset).vectors
    fitted_on: dict[str, Any] = {}
    whitening = None
    if whiten is not None:
        whitening = _fit_whitening(
            whiten, vectors, dataset, lambda: embed(tta_embedder, train_set(True)).vectors
        )
        fitted_on["whiten"] = {"split": "train", "images": len(vectors), "method": whiten.method}
    background = None
    if steps.score_norm is not None:
        background = sample_background(vectors, steps.score_norm)
        fitted_on["score_norm"] = {"split": "train", "background": len(background)}
    return FittedSteps(steps, tta_embedder, whitening, fitted_on, background)


def _fit_whitening(
    whiten: Whiten, vectors: np.ndarray, dataset: ImageDataset, edited: Callable[[], np.ndarray]
) -> Whitening:
    """``whiten`` fitted on the training split's ``vectors``: PCA, learned from its labels'
    pairs, or (``edits``) learned from each image paired with its edited copy (``edited()``
    embeds those), every image its own label."""
    labels = np.array([row.label for row in dataset.rows])
    method = whiten.method
    if method == "edits":
        vectors = np.concatenate([vectors, edited()])
        labels = np.concatenate([np.arange(len(labels))] * 2)
        method = "learned"
    whitening = fit_whitening(
        vectors, dim=whiten.dim, shrinkage=whiten.shrinkage, labels=labels, method=method
    )
    log.info("whitening (%s) fitted on %d training images", whiten.method, len(dataset))
    return whitening


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

"""What evaluate and export share about the search-time stage (``postprocess=``): the steps a
config asks for, and the training split they are fitted on (the data's own, or that of
``data@fit_data=``) embedded with test-time augmentation for
:func:`~retrieval.postprocess.fit_on_training_split`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from retrieval.data.dataset import ImageDataset
from retrieval.models import Embedder
from retrieval.models.extract import Embeddings
from retrieval.postprocess import (
    FittedSteps,
    Postprocess,
    fit_on_training_split,
    needs_training_split,
)

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


def fit_steps(
    steps: Postprocess,
    embedder: Embedder,
    train_set: Callable[[bool], ImageDataset],
    embed: EmbedFn,
) -> tuple[Embedder, FittedSteps]:
    """``steps`` prepared for ``embedder``: its copy with the TTA of ``steps`` (``embedder``
    itself without TTA), and the steps fitted on what that copy makes of ``train_set(False)``
    (``whiten.method=edits``: with ``train_set(True)``, the same images edited) by
    :func:`~retrieval.postprocess.fit_on_training_split`; nothing is embedded when no step
    needs the training split."""
    tta_embedder = embedder.with_search_steps(tta=steps.tta) if steps.tta else embedder
    if not needs_training_split(steps):
        return tta_embedder, FittedSteps(steps)
    dataset = train_set(False)
    vectors = embed(tta_embedder, dataset).vectors
    labels = np.array([row.label for row in dataset.rows])

    def edited() -> np.ndarray:
        return embed(tta_embedder, train_set(True)).vectors

    return tta_embedder, fit_on_training_split(steps, vectors, labels, edited)

"""Composing the project's Hydra configs in-process, as the entry points would, and reading
saved ones back (a checkpoint's, a run folder's) with their ``_target_``s where they are now."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: Modules that a saved config's ``_target_`` may name by a path they no longer have: the old
#: path's prefix -> the present one (:func:`current_targets`).
MOVED_TARGETS = {
    "retrieval.data.converters.": "retrieval.datasets.converters.",
    "retrieval.data.copydetect.": "retrieval.datasets.copydetect.",
    "retrieval.data.demo.": "retrieval.datasets.demo.",
    "retrieval.data.emoji.": "retrieval.datasets.emoji.",
    "retrieval.data.gnd.": "retrieval.datasets.gnd.",
}


def compose_config(overrides: Sequence[str] = (), name: str = "train") -> DictConfig:
    """The config ``python {name}.py OVERRIDES`` would run, with ``${hydra:...}`` resolvable.

    Set ``paths.output_dir`` in ``overrides``: outside ``@hydra.main`` no run directory is made.
    """
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def current_targets(config: Any) -> Any:
    """A saved config (plain dicts and lists, as a checkpoint or a run's ``config.yaml`` holds
    it) with every ``_target_`` that names a moved module (:data:`MOVED_TARGETS`) renamed to
    its present path, everything else as it was; ``config`` itself is not changed."""
    if isinstance(config, dict):
        return {
            key: _current_target(value) if key == "_target_" else current_targets(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [current_targets(value) for value in config]
    return config


def _current_target(target: Any) -> Any:
    for old, new in MOVED_TARGETS.items():
        if isinstance(target, str) and target.startswith(old):
            return new + target[len(old) :]
    return target

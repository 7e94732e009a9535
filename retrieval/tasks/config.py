"""Composing the project's Hydra configs in-process, as the entry points would."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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

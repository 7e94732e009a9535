"""``python TASK.py --help``: the task's usage (its config file's opening comments), the config
groups that task reads with their options, and the composed config. Hydra's own help lists
every group under ``conf/``, so ``export.py --help`` would offer training-only groups (loss,
miner, callbacks) that export ignores; ``--hydra-help`` still gives Hydra's flags."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from retrieval.tasks.config import CONF_DIR

__all__ = ["task_groups", "task_help"]


def _usage(name: str) -> list[str]:
    lines = []
    for line in (CONF_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.removeprefix("#").removeprefix(" "))
    return lines or [f"python {name}.py [group=option ...] [key=value ...]"]


def task_groups(name: str) -> list[str]:
    """The config groups of ``conf/`` that task ``name`` composes: those of its defaults list
    (overlays such as ``experiment`` included, and list groups such as ``postprocess``)."""
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    defaults = config.get("defaults", []) if isinstance(config, dict) else []
    named = {
        str(key).removeprefix("override ").lstrip("/")
        for entry in defaults
        if isinstance(entry, dict)
        for key in entry
    }
    return sorted(g for g in named if g != "hydra" and (CONF_DIR / g).is_dir())


def task_help(name: str, overrides: Sequence[str] = ()) -> str:
    """The help text of ``python {name}.py [overrides] --help``."""
    lines = [*_usage(name), "", "== Configuration groups (group=option) ==", ""]
    for group in task_groups(name):
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"{group}: {', '.join(options)}")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    lines += ["", "== Config (override anything: key=value) ==", "", OmegaConf.to_yaml(cfg)]
    lines.append("Hydra's own flags (-m, --cfg, --info ...): --hydra-help")
    return "\n".join(lines)

"""Resuming a training run: ``python train.py ckpt_path=RUN/checkpoints/last.ckpt [overrides]``.

A resume goes on with the run's own config: the overrides the run was started with (Hydra keeps
them in ``RUN/.hydra/overrides.yaml``), with the resume command's overrides on top, composed
again. What the command changes is printed, key by key. A best score measured on other
validation data (another ``data`` setting, e.g. ``debug=fast``'s first labels against all of
them) is not carried over: the resumed run's best checkpoint starts afresh, and says so.
Without the run's files (a checkpoint copied elsewhere) the command's config is used as given,
with one line saying so. A run's config that names a function by a module path it has since
left (:data:`~retrieval.tasks.config.MOVED_TARGETS`) is read with the present path: no change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from retrieval.tasks.config import current_targets

__all__ = ["Resume", "plan_resume", "resumed_config"]

#: keys that may differ without the run being another run: where it writes, what it resumes
_OWN_KEYS = ("ckpt_path", "paths.output_dir", "num_train_labels", "embedding_size")
#: data settings that change how data is loaded, not what the validation split holds
_LOADING_KEYS = ("num_workers", "eval_batch_size", "pin_memory", "persistent_workers")


@dataclass(frozen=True)
class Resume:
    """What a resume does: the ``overrides`` to compose (the run's, then the command's) and the
    ``config`` they compose to, the settings that differ from the run's (``key: (run's value,
    resumed value)``), whether the run's best score may be carried over, and a ``note`` when
    the run's files are missing (then ``config`` is None: the command's config as given)."""

    run_dir: Path | None
    overrides: list[str]
    config: DictConfig | None = None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    carry_best: bool = True
    note: str | None = None

    def lines(self) -> list[str]:
        """What to print before training goes on."""
        if self.note:
            return [self.note]
        lines = [f"resuming {self.run_dir} with its config ({' '.join(self.overrides)})"]
        for key, (old, new) in sorted(self.changed.items()):
            lines.append(f"  {key}: {old!r} -> {new!r}")
        if not self.carry_best:
            lines.append(
                "  the run's best score was measured on other validation data: the best "
                "checkpoint starts afresh"
            )
        return lines


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _run_dir_of(ckpt_path: str) -> Path | None:
    """``RUN`` of ``RUN/checkpoints/NAME.ckpt`` when it holds the run's saved overrides."""
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / ".hydra" / "overrides.yaml").is_file() else None


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key: (old, new)`` of the settings that differ, paths inside each run's own folder
    compared relative to it (every run writes into its own)."""
    a, b = _flat(old), _flat(new)
    homes = a.get("paths.output_dir"), b.get("paths.output_dir")

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, str) and isinstance(y, str) and all(homes):
            return x.replace(str(homes[0]), "RUN") == y.replace(str(homes[1]), "RUN")
        return bool(x == y)

    keys = (set(a) | set(b)) - set(_OWN_KEYS)
    return {k: (a.get(k), b.get(k)) for k in keys if not same(a.get(k), b.get(k))}


def _same_validation(changed: Mapping[str, tuple[Any, Any]]) -> bool:
    """Whether the validation split is the run's: no ``data`` setting other than loading
    changed (seed included: it may draw the split)."""
    for key in changed:
        if key == "seed" or (key.startswith("data.") and key.split(".")[1] not in _LOADING_KEYS):
            return False
    return True


def plan_resume(
    ckpt_path: str,
    command: Sequence[str],
    compose: Callable[[list[str]], DictConfig],
) -> Resume:
    """How ``python train.py ckpt_path=CKPT COMMAND...`` resumes (``command``: the command's
    overrides, ``ckpt_path`` among them); ``compose`` turns overrides into the resolved
    config."""
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    run_dir = _run_dir_of(ckpt_path)
    if run_dir is None:
        note = (
            f"{ckpt_path} is not in a run folder of train.py (RUN/checkpoints/, with "
            "RUN/.hydra/overrides.yaml): resuming with this command's config as given"
        )
        return Resume(None, list(command), note=note)
    saved = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    given = {_key(o) for o in command}
    overrides = [str(o) for o in saved if _key(str(o)) not in given] + list(command)
    old = (
        current_targets(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if (run_dir / "config.yaml").is_file()
        else None
    )
    config = compose(overrides)
    new = OmegaConf.to_container(config, resolve=True)
    changed = (
        _differences(old, cast(dict[str, Any], new))
        if isinstance(old, dict) and isinstance(new, dict)
        else {}
    )
    return Resume(run_dir, overrides, config, changed, carry_best=_same_validation(changed))


def epochs_trained(checkpoint: str | Path) -> int | None:
    """Epochs whose training a Lightning checkpoint had finished (its fit loop's processed
    epochs: an interrupted epoch does not count); None when the file does not say."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except Exception:  # not a Lightning checkpoint of this layout: Lightning itself will say
        return None


def _check_epochs_left(checkpoint: str, max_epochs: Any) -> None:
    """Refuse, with the override that trains on, a resume that has nothing left to train."""
    done = epochs_trained(checkpoint)
    if done is None or max_epochs in (None, -1) or done < int(max_epochs):
        return
    raise ValueError(
        f"{checkpoint} has trained {done} epochs, all that trainer.max_epochs={max_epochs} asks "
        f"for, so there is nothing to resume; train longer with e.g. "
        f"trainer.max_epochs={done + max(1, done // 2)}"
    )


def resumed_config(cfg: DictConfig) -> DictConfig:
    """Inside ``train.py``'s Hydra app: ``cfg`` itself when it resumes nothing; else the config
    :func:`plan_resume` composes, what differs printed, the run folder's saved overrides made
    those it resumed with (so that resuming the resume works alike)."""
    if not cfg.get("ckpt_path"):
        return cfg
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from retrieval.infra.io import atomic_write

    hydra_cfg = HydraConfig.get()
    name = str(hydra_cfg.job.config_name)
    plan = plan_resume(
        str(cfg.ckpt_path),
        list(hydra_cfg.overrides.task),
        lambda overrides: compose(name, overrides=overrides),
    )
    print("\n".join(plan.lines()), flush=True)
    # the file itself: logs/train/runs/latest moves to this run as soon as training starts
    checkpoint = str(Path(str(cfg.ckpt_path)).resolve())
    resumed = cfg if plan.config is None else plan.config
    _check_epochs_left(checkpoint, resumed.trainer.get("max_epochs"))
    with open_dict(resumed):
        resumed.ckpt_path = checkpoint
    if plan.config is None:
        return resumed
    if not plan.carry_best and "model_checkpoint" in (resumed.get("callbacks") or {}):
        with open_dict(resumed):
            resumed.callbacks.model_checkpoint.carry_best = False
    saved = Path(hydra_cfg.runtime.output_dir) / str(hydra_cfg.output_subdir) / "overrides.yaml"
    if saved.parent.is_dir():
        with atomic_write(saved, "w", encoding="utf-8") as handle:
            named = [
                o if _key(o) != "ckpt_path" else f"ckpt_path={checkpoint}" for o in plan.overrides
            ]
            handle.write(OmegaConf.to_yaml(OmegaConf.create(named)))
    return resumed

"""Checking an entry point's command line before Hydra runs it, so common mistakes get one line
that names the key and the fix instead of a traceback:

* an unknown group or key (``lossx=triplet``, ``sampler.labels_per_bach=8``): the closest names;
* an unknown option of a group (``loss=tripletx``): the closest options;
* a mandatory value left out (``data=folder`` without ``data.root``): the key and an example.

Only plain override lists are checked; with flags (``-m``, ``--cfg`` ...) Hydra handles the
command line alone. ``--help`` prints the task's own help (:mod:`retrieval.tasks.help`).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from retrieval.tasks.config import CONF_DIR

__all__ = ["check_command_line", "problem_with"]

EXIT_USAGE = 2


def _compose(name: str, overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _close(word: str, candidates: Sequence[str]) -> str:
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(found)}?" if found else "no name is close to it"


def _key_of(override: str) -> str:
    return re.sub(r"^[+~]+", "", override.split("=", 1)[0])


def _groups() -> list[str]:
    return [p.name for p in CONF_DIR.iterdir() if p.is_dir()]


def _unknown_key(name: str, overrides: Sequence[str], full_key: str, bad: str) -> str:
    """``bad`` (an override) names ``full_key``, which the config does not have."""
    parent, _, leaf = full_key.rpartition(".")
    rest = [o for o in overrides if o != bad]
    try:
        cfg = _compose(name, rest)
    except Exception:  # another override is wrong too: name this one without candidates
        return f"{bad}: the config has no key {full_key}"
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
    if not parent:
        keys += _groups()
    where = f"under {parent}" if parent else "at the top"
    return (
        f"{bad}: no config group or key '{leaf}' {where}; {_close(leaf, keys)} "
        f"(a new key is added with +{bad})"
    )


def _unknown_option(message: str, bad: str) -> str:
    group, option = re.search(r"Could not find '([^']+)/([^'/]+)'", message).groups()  # type: ignore[union-attr]
    folder = CONF_DIR / group
    options = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return (
        f"{bad}: {group} has no option '{option}'; {_close(option, options)} "
        f"(options: {', '.join(options)})"
    )


def _example(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf.startswith("out"):
        return f"{key}=/path/to/output"
    if re.search(r"root|dir|folder|path|images|gallery", leaf):
        return f"{key}=/path/to/images"
    if "manifest" in leaf:
        return f"{key}=/path/to/manifest.csv"
    return f"{key}=VALUE"


def _missing(node: object, prefix: str = "") -> list[str]:
    """Keys whose value is ``???`` in an unresolved container, ``data.root`` style."""
    if isinstance(node, dict):
        items = [(f"{prefix}{k}", v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(f"{prefix}{i}", v) for i, v in enumerate(node)]
    else:
        return []
    found = []
    for key, value in items:
        if value == "???":
            found.append(key)
        else:
            found += _missing(value, f"{key}.")
    return found


def problem_with(name: str, overrides: Sequence[str]) -> str | None:
    """One line saying what is wrong with ``python {name}.py OVERRIDES``, None if nothing
    found (then Hydra reports whatever else may be wrong)."""
    try:
        cfg = _compose(name, overrides)
    except MissingConfigException as err:
        bad = next(
            (
                o
                for o in overrides
                if "Could not find" in str(err) and f"'{_key_of(o)}/" in str(err)
            ),
            None,
        )
        if bad is None:
            return None
        return _unknown_option(str(err), bad)
    except ConfigCompositionException as err:
        found = re.search(r"Could not override '([^']+)'", str(err))
        cause = re.search(r"full_key: (\S+)", str(err.__cause__ or ""))
        if not found or not cause:
            return None
        bad = next((o for o in overrides if _key_of(o) == found.group(1)), found.group(1))
        return _unknown_key(name, overrides, cause.group(1), bad)
    except Exception:  # anything else: Hydra's own message
        return None
    missing = sorted(k for k in _missing(OmegaConf.to_container(cfg, resolve=False)))
    if not missing:
        return None
    command = " ".join([f"python {name}.py", *overrides, *(_example(k) for k in missing)])
    return (
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required and not given; "
        f"e.g. {command}"
    )


def check_command_line(name: str, argv: Sequence[str] | None = None) -> None:
    """Exit with one ``error:`` line (status 2) when :func:`problem_with` finds a problem in
    ``argv`` (default ``sys.argv[1:]``); return otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if {"--help", "-h"} & set(args) and all(a in ("--help", "-h") or "=" in a for a in args):
        from retrieval.tasks.help import task_help  # this task's groups, not all of conf/

        print(task_help(name, [a for a in args if "=" in a]))
        raise SystemExit(0)
    if any(a.startswith("-") for a in args):
        return
    problem = problem_with(name, [a for a in args if not a.startswith(("hydra.", "hydra/"))])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


if __name__ == "__main__":  # pragma: no cover - python -m retrieval.tasks.preflight train ...
    check_command_line(sys.argv[1], sys.argv[2:])
    print(Path(sys.argv[1]).name, "OK")

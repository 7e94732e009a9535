"""Checking an entry point's command line before Hydra runs it, so common mistakes get one line
that names the key and the fix instead of a traceback:

* an argument that is no override (``''``, ``noequals``): what an override looks like;
* an unknown group or key (``lossx=triplet``, ``sampler.labels_per_bach=8``): the closest names,
  groups among the task's own (``export.py model=...``: export has no ``model`` group);
* an unknown option of a group (``loss=tripletx``): the closest options;
* a key deleted that is not there (``~nokey``);
* a mandatory value left out (``data=folder`` without ``data.root``): the key and an example;
* a value of the wrong type for the object it configures (``trainer.max_epochs=abc``): the
  key and the type the ``_target_``'s signature gives (types it cannot judge pass);
* ``trainer=gpu`` where torch sees no GPU: the CPU trainers to use instead;
* torch and torchvision builds that do not belong together (read from their version files,
  nothing imported): both versions and the one command that reinstalls a matching pair.

Any other refusal of Hydra's while composing is its first line.

Only plain override lists are checked; with flags (``-m``, ``--cfg`` ...) Hydra handles the
command line alone. ``--help`` prints the task's own help:

``python TASK.py --help``: the task's usage (its config file's opening comments), the config
groups that task reads with their options, and the composed config. Hydra's own help lists
every group under ``conf/``, so ``export.py --help`` would offer training-only groups (loss,
miner, callbacks) that export ignores; ``--hydra-help`` still gives Hydra's flags.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from retrieval.tasks.config import CONF_DIR

__all__ = [
    "check_command_line",
    "install_problem",
    "installed_torch_problem",
    "problem_with",
    "task_groups",
    "task_help",
]


EXIT_USAGE = 2


def _compose(name: str, overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _close(word: str, candidates: Sequence[str]) -> str:
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(found)}?" if found else "no name is close to it"


def _key_of(override: str) -> str:
    return re.sub(r"^[+~]+", "", override.split("=", 1)[0])


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _syntax_problem(override: str) -> str | None:
    """Why ``override`` is no Hydra override (None when it is one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    how = "write key=value, group=option, +key=value or ~key"
    if not override.strip():
        return f"{override!r} is an empty override: {how}"
    try:
        OverridesParser.create().parse_override(override)
    except HydraException as err:  # OverrideParseException, or its parser's own
        return f"{override!r} is not an override ({_first_line(err)}): {how}"
    return None


def _foreign_group(name: str, group: str, bad: str) -> str | None:
    """For a ``group`` of ``conf/`` that task ``name`` does not compose: the line saying so."""
    if not (CONF_DIR / group).is_dir() or group in task_groups(name):
        return None
    groups = task_groups(name)
    return (
        f"{bad}: {name} has no config group '{group}'; {_close(group, groups)} "
        f"({name}.py composes {', '.join(groups)})"
    )


def _unknown_key(name: str, overrides: Sequence[str], full_key: str, bad: str) -> str:
    """``bad`` (an override) names ``full_key``, which the config does not have."""
    parent, _, leaf = full_key.rpartition(".")
    foreign = None if parent else _foreign_group(name, leaf, bad)
    if foreign:
        return foreign
    rest = [o for o in overrides if o != bad]
    try:
        cfg = _compose(name, rest)
    except Exception:  # another override is wrong too: name this one without candidates
        return f"{bad}: the config has no key {full_key}"
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
    if not parent:
        keys += task_groups(name)
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


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "text",
    bool: "true or false",
    type(None): "null",
}


def _expected_type(target: str, argument: str) -> Any:
    """The annotation of ``argument`` in the signature of ``target`` (a class or function
    path, as in ``_target_``); None when it has none or it cannot be read."""
    from hydra.utils import get_object

    try:
        found = get_object(target)
        hints = typing.get_type_hints(found.__init__ if inspect.isclass(found) else found)
    except Exception:  # not importable, or annotations that do not evaluate here
        return None
    return hints.get(argument)


def _fits_type(value: Any, expected: Any) -> bool:
    """Whether ``value`` (a config value: scalar, list or dict) is of type ``expected``;
    true for types this cannot judge (classes other than the JSON ones), and for a number
    where text is expected (Hydra reads ``name=123`` as a number)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        return any(_fits_type(value, a) for a in args)
    if origin is Literal:
        return value in args
    if expected in (int, float) and isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    if expected is str:  # a number written where text is wanted is text quoted, e.g. '123'
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if expected in _TYPE_NAMES:
        return isinstance(value, expected)
    kind = origin or expected
    if kind in (list, tuple) or kind is Sequence:
        return isinstance(value, (list, tuple))
    if kind is dict or kind is Mapping:
        return isinstance(value, dict)
    return True


def _describe_type(expected: Any) -> str:
    """``Optional[int]`` -> ``an integer or null``."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (Union, types.UnionType):
        names = [_describe_type(a) for a in args]
        return " or ".join(dict.fromkeys(names))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    return _TYPE_NAMES.get(expected, getattr(origin or expected, "__name__", str(expected)))


def _composition_problem(
    name: str, overrides: Sequence[str], err: ConfigCompositionException
) -> str:
    """The line for an override Hydra could not apply."""
    message = str(err)

    def named(key: str) -> str:  # the override that names ``key``
        return next((o for o in overrides if _key_of(o) == key), key)

    found = re.search(
        r"Could not (?:override|delete) '([^']+)'\. No match in the defaults", message
    )
    if found:
        bad = named(found.group(1))
        return _foreign_group(name, found.group(1), bad) or f"{bad}: {_first_line(err)}"
    found = re.search(r"Could not delete from config\. '([^']+)' does not exist", message)
    if found:
        return f"{named(found.group(1))}: the config has no key {found.group(1)} to delete"
    found = re.search(r"Could not override '([^']+)'", message)
    cause = re.search(r"full_key: (\S+)", str(err.__cause__ or ""))
    if found and cause:
        return _unknown_key(name, overrides, cause.group(1), named(found.group(1)))
    return _first_line(err)


def _missing_problem(name: str, overrides: Sequence[str], cfg: DictConfig) -> str | None:
    """The line naming the mandatory values (``???``) left out, with an example command."""
    missing = sorted(k for k in _missing(OmegaConf.to_container(cfg, resolve=False)))
    if not missing:
        return None
    command = " ".join([f"python {name}.py", *overrides, *(_example(k) for k in missing)])
    return (
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required and not given; "
        f"e.g. {command}"
    )


def _type_problem(cfg: DictConfig, overrides: Sequence[str]) -> str | None:
    """The line for the first ``key=value`` whose value is not of the type the signature of
    its node's ``_target_`` gives the key (None when each fits, or cannot be judged)."""
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        key = _key_of(override)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else None
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        fields = OmegaConf.to_container(node, resolve=False)
        value: Any = fields.get(leaf) if isinstance(fields, dict) else None
        expected = _expected_type(str(fields.get("_target_")), leaf)  # type: ignore[union-attr]
        if expected is None or (isinstance(value, str) and "${" in value):
            continue
        if not _fits_type(value, expected):
            return f"{override}: {key} must be {_describe_type(expected)}, got {value!r}"
    return None


def _build_tag(version: str) -> str:
    """``2.14.1+cu130`` -> ``cu130``; ``""`` when the version has no local build tag."""
    return version.partition("+")[2]


def _describe_build(tag: str) -> str:
    if tag == "cpu":
        return "the CPU"
    found = re.fullmatch(r"cu(\d+)(\d)", tag)
    return f"CUDA {found.group(1)}.{found.group(2)}" if found else tag


def _minor(version: str, major: str) -> int | None:
    """``2.14.1+cpu`` with major ``2`` -> 14; None for another major or no number."""
    parts = version.partition("+")[0].split(".")
    ok = len(parts) > 1 and parts[0] == major and parts[1].isdigit()
    return int(parts[1]) if ok else None


def install_problem(torch_version: str, vision_version: str) -> str | None:
    """Why torch ``torch_version`` and torchvision ``vision_version`` (``__version__``
    strings, e.g. ``2.14.1+cpu``) cannot work together, None when they can: torchvision
    0.(N + 15) belongs to torch 2.N, and both must be built for the same platform (their
    ``+cpu`` / ``+cuXYZ`` tags; a version without a tag is not judged). Otherwise
    torchvision's compiled operators fail to load (``operator torchvision::nms does not
    exist``)."""
    torch_minor = _minor(torch_version, "2")
    wanted = None if torch_minor is None else torch_minor + 15
    paired = wanted is None or _minor(vision_version, "0") == wanted
    tags = _build_tag(torch_version), _build_tag(vision_version)
    if paired and (not all(tags) or tags[0] == tags[1]):
        return None
    if paired:
        builds = " and ".join(_describe_build(tag) for tag in tags)
        why = f"are builds for different platforms ({builds})"
    else:
        why = f"do not belong together (torch 2.{torch_minor} goes with torchvision 0.{wanted})"
    vision = f"'torchvision==0.{wanted}.*'" if wanted is not None else "torchvision"
    return (
        f"torch {torch_version} and torchvision {vision_version} {why}, so torchvision's "
        "operators cannot load; reinstall a matching pair: pip install --force-reinstall "
        f"torch=={torch_version.partition('+')[0]} {vision} --index-url "
        f"https://download.pytorch.org/whl/{tags[0] or 'cpu'}"
    )


def _installed_version(package: str) -> str | None:
    """``__version__`` from ``package``'s own ``version.py``, read as text (no import)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    try:
        text = Path(spec.origin).with_name("version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def installed_torch_problem() -> str | None:
    """:func:`install_problem` for the torch and torchvision this interpreter would import."""
    torch_version, vision_version = _installed_version("torch"), _installed_version("torchvision")
    if torch_version is None or vision_version is None:
        return None
    return install_problem(torch_version, vision_version)


def _accelerator_problem(cfg: DictConfig, overrides: Sequence[str]) -> str | None:
    """The line for a trainer that asks for a GPU where torch sees none (torch is imported
    only when one is asked for)."""
    trainer = cfg.get("trainer")
    accelerator = str(trainer.get("accelerator", "auto")) if isinstance(trainer, DictConfig) else ""
    if accelerator not in ("gpu", "cuda"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    named = next(
        (o for o in overrides if _key_of(o).startswith(("trainer", "experiment"))),
        f"trainer.accelerator={accelerator}",
    )
    return (
        f"{named} trains on a GPU, and torch {torch.__version__} sees none; train on the CPU "
        "with trainer=default (or trainer=cpu)"
    )


def problem_with(name: str, overrides: Sequence[str], hardware: bool = False) -> str | None:
    """One line saying what is wrong with ``python {name}.py OVERRIDES``, None if nothing
    found (then Hydra reports whatever else may be wrong). ``hardware``: also whether this
    machine has what the config asks for (a GPU), not only whether the config is right."""
    for override in overrides:
        problem = _syntax_problem(override)
        if problem:
            return problem
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
        return _unknown_option(str(err), bad) if bad else _first_line(err)
    except ConfigCompositionException as err:
        return _composition_problem(name, overrides, err)
    except HydraException as err:  # any other refusal of Hydra's: its first line
        return _first_line(err)
    except Exception:  # anything else: Hydra's own message
        return None
    return (
        _missing_problem(name, overrides, cfg)
        or _type_problem(cfg, overrides)
        or (_accelerator_problem(cfg, overrides) if hardware else None)
    )


def check_command_line(name: str, argv: Sequence[str] | None = None) -> None:
    """Exit with one ``error:`` line (status 2) when :func:`problem_with` finds a problem in
    ``argv`` (default ``sys.argv[1:]``); return otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if {"--help", "-h"} & set(args) and all(a in ("--help", "-h") or "=" in a for a in args):
        from retrieval.tasks.preflight import task_help  # this task's groups, not all of conf/

        print(task_help(name, [a for a in args if "=" in a]))
        raise SystemExit(0)
    if any(a.startswith("-") for a in args):
        return
    overrides = [a for a in args if not a.startswith(("hydra.", "hydra/"))]
    problem = installed_torch_problem() or problem_with(name, overrides, hardware=True)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


if __name__ == "__main__":  # pragma: no cover - python -m retrieval.tasks.preflight train ...
    check_command_line(sys.argv[1], sys.argv[2:])
    print(Path(sys.argv[1]).name, "OK")


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

"""The markdown table of the benchmark recipes' runs (scripts/reproduce_benchmarks.sh).

    python scripts/benchmark_table.py RUNS_DIR --output experiments/DATE_benchmarks_gpu.md
    python scripts/benchmark_table.py RUNS_DIR --recipes cub200_resnet50 cub200_vit_small

RUNS_DIR holds one folder per recipe, named after it (``hydra.run.dir=RUNS_DIR/<recipe>``):
``metrics.json`` and ``config.yaml`` as train.py writes them, ``wall_s`` (seconds, written by
the shell script), ``skipped.txt`` (why it did not run) or ``train.log``. Each row: the recipe,
the published figure its config's ``# Target:`` line names, the best test R@1 (validation runs
on the test split), the last epoch's other metrics and the backbone as-is, epochs, wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "experiment"
COLUMNS = (
    "recipe",
    "published target (source)",
    "measured R@1",
    "other metrics",
    "epochs",
    "wall time",
)


def published_target(recipe: str, conf_dir: Path = CONF) -> str:
    """The text after ``# Target:`` in the recipe's header, or ``-`` when it names none."""
    path = conf_dir / f"{recipe}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe; see {conf_dir} for the names")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# Target:"):
            return line.removeprefix("# Target:").strip().rstrip(".")
    return "-"


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _other_metrics(metrics: dict[str, Any]) -> str:
    """Last validation's metrics besides R@1, then the backbone as-is (``pretrained/``)."""
    parts = []
    if "val/recall@1" in metrics:
        parts.append(f"last R@1 {_percent(metrics['val/recall@1'])}")
    recalls = sorted(
        (int(k.split("@")[1]), v)
        for k, v in metrics.items()
        if k.startswith("val/recall@") and k != "val/recall@1"
    )
    parts += [f"R@{k} {_percent(v)}" for k, v in recalls]
    names = {"val/map@r": "MAP@R", "val/r_precision": "RP"}
    parts += [f"{label} {_percent(metrics[key])}" for key, label in names.items() if key in metrics]
    if "pretrained/recall@1" in metrics:
        parts.append(f"backbone as-is R@1 {_percent(metrics['pretrained/recall@1'])}")
    return ", ".join(parts) or "-"


def run_row(recipe: str, run_dir: Path, conf_dir: Path = CONF) -> list[str]:
    """The table row of one recipe's run folder (which may be missing, skipped or failed)."""
    target = published_target(recipe, conf_dir)
    if (run_dir / "skipped.txt").is_file():
        reason = (run_dir / "skipped.txt").read_text(encoding="utf-8").strip()
        return [recipe, target, f"skipped: {reason}", "-", "-", "-"]
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        log = run_dir / "train.log"
        why = f"failed, see {log}" if log.is_file() else f"not run ({run_dir} has no metrics.json)"
        return [recipe, target, why, "-", "-", "-"]
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    best = metrics.get("best/val/recall@1", metrics.get("val/recall@1"))
    measured = _percent(best) if best is not None else "-"
    config_file = run_dir / "config.yaml"
    config = (
        yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    )
    epochs = (config or {}).get("trainer", {}).get("max_epochs", "-")
    wall_file = run_dir / "wall_s"
    wall = _duration(float(wall_file.read_text().strip())) if wall_file.is_file() else "-"
    return [recipe, target, measured, _other_metrics(metrics), str(epochs), wall]


def table(recipes: Sequence[str], runs_dir: Path, conf_dir: Path = CONF) -> str:
    """Markdown table, one row per recipe, in the order given."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for recipe in recipes:
        cells = run_row(recipe, runs_dir / recipe, conf_dir)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _hardware() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_model

    return cpu_model()


def report(recipes: Sequence[str], runs_dir: Path, command: str) -> str:
    """The experiments/ page: what ran, where, how it is measured, and the table."""
    return (
        f"# Benchmark recipes, {datetime.date.today().isoformat()}\n\n"
        f"Command: `{command}`\nHardware: {_hardware()}\nRuns: `{runs_dir}`\n\n"
        "Measured R@1 is the best test R@1 over the validated epochs (validation runs on the "
        "test split, as the papers' code reports it); `last R@1` is the final epoch's. Metrics "
        "in percent. The backbone as-is is average-pooled, without the head.\n\n"
        + table(recipes, runs_dir)
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--recipes", nargs="*", help="default: every folder in RUNS_DIR")
    parser.add_argument("--output", type=Path, help="markdown file; default: print")
    parser.add_argument("--command", default="bash scripts/reproduce_benchmarks.sh")
    args = parser.parse_args(argv)
    recipes = args.recipes or sorted(p.name for p in args.runs_dir.iterdir() if p.is_dir())
    text = report(recipes, args.runs_dir, args.command)
    if args.output is None:
        print(text, end="")
        return
    sys.path.insert(0, str(ROOT))
    from retrieval.infra.io import atomic_write

    with atomic_write(args.output, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

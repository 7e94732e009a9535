"""``python TASK.py --help`` lists the config groups that task reads, not every group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.tasks.preflight import task_groups

ROOT = Path(__file__).resolve().parents[2]
TRAINING_ONLY = {"loss", "miner", "callbacks", "optimizer", "scheduler", "sampler", "trainer"}


def help_of(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, script, *args, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def listed_groups(text: str) -> set[str]:
    section = text.split("== Configuration groups", 1)[1].split("== Config ", 1)[0]
    return {line.split(":", 1)[0] for line in section.splitlines()[1:] if ":" in line}


def test_export_help_lists_its_groups_only() -> None:
    text = help_of("export.py", "index=hnsw")
    assert text.startswith("python export.py [ckpt_path=")  # its usage, from conf/export.yaml
    assert listed_groups(text) == {"backbone", "data", "index", "inference", "paths", "postprocess"}
    assert "index: flat, hnsw, ivf_flat, ivf_pq" in text
    assert "factory: HNSW32" in text  # the config as composed with the overrides given
    assert not TRAINING_ONLY & listed_groups(text)


@pytest.mark.parametrize(
    ("task", "has", "lacks"),
    [
        ("train", TRAINING_ONLY | {"experiment", "debug", "hparams_search"}, {"index"}),
        ("evaluate", {"index", "inference", "postprocess", "logger", "data"}, TRAINING_ONLY),
        ("embed", {"backbone", "inference", "paths"}, TRAINING_ONLY | {"index"}),
    ],
)
def test_each_task_reads_its_own_groups(task: str, has: set[str], lacks: set[str]) -> None:
    groups = set(task_groups(task))
    assert has <= groups and not lacks & groups, groups

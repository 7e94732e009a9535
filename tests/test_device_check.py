"""scripts/device_check.sh: its dry run on the CPU prints the table with a positive number in
every row, and a part that fails is a FAILED row, not an abort."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ROWS = ("training resnet18 32px bf16", "embedding resnet18 32px bf16", "exact search 20,000 x 64")


def device_check(*args: str, out: Path) -> subprocess.CompletedProcess:
    command = ["bash", "scripts/device_check.sh", *args, "--out", str(out)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def table_rows(text: str) -> dict[str, list[str]]:
    """``| name | value | unit | details |`` lines of the printed table, by name."""
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in text.splitlines()]
    return {c[0]: c[1:] for c in cells if len(c) == 4 and c[0] not in ("measurement", "---")}


@pytest.mark.slow
def test_dry_run_prints_every_measurement(tmp_path):
    done = device_check("--dry-run", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "DRY RUN" in done.stdout
    rows = table_rows(done.stdout)
    for name in ROWS:
        row = next(v for k, v in rows.items() if k.startswith(name))
        value = float(row[0].replace(",", ""))
        assert value > 0 and row[1] in ("images/s", "queries/s"), row
    assert "random init" in rows[next(k for k in rows if k.startswith("training"))][2]
    search = rows[next(k for k in rows if k.startswith("exact search"))][2]
    assert "torch matmul + topk on cpu" in search
    assert re.search(r"overlap with CPU FAISS exact search 100\.0%", search), search
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert [r["part"] for r in saved["rows"]] == ["train", "embed", "search"]
    assert all(r["ok"] and r["value"] > 0 for r in saved["rows"])
    assert (tmp_path / "device_check.md").read_text().strip() in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without GPU")
def test_a_failed_part_is_a_row_and_the_others_still_run(tmp_path):
    """Without --dry-run on a machine without CUDA every part fails: each is reported."""
    done = device_check("--only", "search", "--only", "embed", out=tmp_path)
    assert done.returncode == 1
    rows = table_rows(done.stdout)
    assert len(rows) == 2
    for value, _, details in rows.values():
        assert value == "FAILED" and "RuntimeError: no CUDA device visible" in details
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert [r["part"] for r in saved["rows"]] == ["search", "embed"]

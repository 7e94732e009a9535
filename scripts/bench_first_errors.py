"""Benchmark: how long a newcomer's common mistakes take to answer, wall time from the command to
its one ``error:`` line (median of ``--repeats`` runs each, on an idle machine).

Every command must exit with status 2 and print exactly one line on stderr that starts with
``error:``; a row says so when one does not. Usage:
``python scripts/bench_first_errors.py [--repeats 5] [--output experiments/X.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model  # scripts/ is on sys.path when this runs

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def commands(scratch: Path, port: int) -> list[tuple[str, list[str]]]:
    """``(what, argv)`` of each mistake; paths under ``scratch`` do not exist."""
    missing = str(scratch / "nowhere")
    return [
        ("loss option misspelt", [PY, "train.py", "loss=multi_similarty"]),
        ("backbone option misspelt", [PY, "train.py", "backbone=resnet5"]),
        ("key misspelt", [PY, "train.py", "sampler.labels_per_bach=8"]),
        ("data.root left out", [PY, "train.py", "data=folder"]),
        ("trainer=gpu without a GPU", [PY, "train.py", "trainer=gpu"]),
        ("resume from a missing checkpoint", [PY, "train.py", f"ckpt_path={missing}.ckpt"]),
        ("evaluate: backbone misspelt", [PY, "evaluate.py", "backbone=resnet5"]),
        ("export: group of another task", [PY, "export.py", "loss=ntxent"]),
        ("retrieval info: no such bundle", ["retrieval", "info", missing]),
        ("retrieval search: no such bundle", ["retrieval", "search", missing, "q.jpg"]),
        ("retrieval serve: port in use", ["retrieval", "serve", missing, "--port", str(port)]),
        ("retrieval duplicates: no such folder", ["retrieval", "duplicates", missing]),
    ]


def run_once(argv: list[str]) -> tuple[float, int, list[str]]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    return seconds, done.returncode, done.stderr.strip().splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for what, argv in commands(Path(scratch), taken.getsockname()[1]):
            times, last = [], (0, [])
            for _ in range(args.repeats):
                seconds, code, err = run_once(argv)
                times.append(seconds)
                last = (code, err)
            code, err = last
            ok = code == 2 and len(err) == 1 and err[0].startswith("error:")
            shown = " ".join(a if a != PY else "python" for a in argv)
            verdict = "one error line" if ok else f"NOT one line (exit {code}, {len(err)} lines)"
            rows.append((what, shown, statistics.median(times), max(times), verdict, err[-1:]))
    load = os.getloadavg()[0]
    lines = [
        "## bench_first_errors",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores, load average {load:.2f}",
        f"- python {sys.version.split()[0]}; {args.repeats} runs per command, wall time",
        "",
        "| mistake | command | median s | max s | answer |",
        "|---|---|---:|---:|---|",
    ]
    for what, shown, median, most, verdict, err in rows:
        said = f"{verdict}: `{err[0][:110]}`" if err else verdict
        lines.append(f"| {what} | `{shown}` | {median:.2f} | {most:.2f} | {said} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()

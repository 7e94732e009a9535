"""Benchmark: our evaluation against pytorch-metric-learning's AccuracyCalculator.

Each measurement runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own; data
are synthetic, clustered, L2-normalised and identical for both (seeded). Measured: wall time
of the metric computation only (data generation excluded), median over ``--repeats`` runs,
and the process's peak RSS.

    python scripts/bench_eval.py                 # SOP-sized, 200k x 128, and the 1M gallery
    python scripts/bench_eval.py --quick         # small sizes: checks the script in seconds
    python scripts/bench_eval.py --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (items, dim, mean images per label, queries for a query/gallery run or 0)
DATASETS = {
    "sop": (60_502, 512, 5.35, 0),
    "200k": (200_000, 128, 10.0, 0),
    "1m": (1_000_000, 128, 10.0, 10_000),
}
QUICK = {
    "sop": (6_000, 512, 5.35, 0),
    "200k": (20_000, 128, 10.0, 0),
    "1m": (100_000, 128, 10.0, 1_000),
}


#: per-dimension noise around each label's centre, by dim: recall@1 well below 1
NOISE = {128: 1.4, 512: 2.3}


def _points(centres: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around ``centres[labels]``, built in blocks (no float64 copy of 1M rows)."""
    x = np.empty((len(labels), centres.shape[1]), dtype=np.float32)
    step = 100_000
    for start in range(0, len(labels), step):
        y = labels[start : start + step]
        block = centres[y] + NOISE[centres.shape[1]] * rng.standard_normal(
            (len(y), centres.shape[1]), np.float32
        )
        x[start : start + step] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def make_data(
    n: int, dim: int, per_label: float, queries: int = 0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` gallery vectors in labels of about ``per_label`` items each (at least 2), and
    ``queries`` more vectors of labels drawn from the gallery's."""
    rng = np.random.default_rng(seed)
    high = int(round(2 * per_label)) - 1  # sizes 2 .. high - 1, mean ~per_label
    sizes = rng.integers(2, high, size=int(1.2 * n / per_label) + 10)
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    centres = rng.standard_normal((int(labels.max()) + 1, dim), np.float32)
    query_labels = rng.choice(labels, size=queries)
    return _points(centres, labels, rng), labels, _points(centres, query_labels, rng), query_labels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def child(which: str, dataset: str, quick: bool) -> dict[str, object]:
    n, dim, per_label, queries = (QUICK if quick else DATASETS)[dataset]
    x, labels, q, query_labels = make_data(n, dim, per_label, queries)
    if which == "ours":
        from retrieval.evaluation import evaluate_embeddings
    else:
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    data_mb = peak_rss_mb()
    start = time.perf_counter()
    if which == "ours":
        metrics = ("recall", "map@r", "r_precision")
        if queries:  # the whole default evaluation, full mAP included
            result = evaluate_embeddings(q, query_labels, x, labels, ks=(1, 10, 100))
        else:
            result = evaluate_embeddings(x, labels, ks=(1,), metrics=metrics)
        values = {
            "precision_at_1": result.metrics["recall@1"],
            "r_precision": result.metrics["r_precision"],
            "mean_average_precision_at_r": result.metrics["map@r"],
        }
    else:
        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count",
            device=torch.device("cpu"),
        )
        values = calc.get_accuracy(x, labels, ref_includes_query=True)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "data_rss_mb": data_mb,
        "values": {k: float(v) for k, v in values.items()},
    }


def run_child(which: str, dataset: str, quick: bool) -> dict[str, object]:
    """One measurement in a fresh process; ``{"error": ...}`` when it failed (e.g. ran out of
    memory), so the other measurements still run."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            which,
            "--dataset",
            dataset,
            *(["--quick"] if quick else []),
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {out.returncode}: {last[:300]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--child", choices=("ours", "pml"), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", choices=tuple(DATASETS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dataset, args.quick)))
        return

    sizes = QUICK if args.quick else DATASETS
    lines = [
        f"# bench_eval ({'quick' if args.quick else 'full'}) on {platform.node()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}",
        "",
        "| data | impl | time s (median) | peak RSS MB | RSS before MB | P@1 | R-prec | MAP@R |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for dataset in ("sop", "200k", "1m"):
        n, dim, per_label, queries = sizes[dataset]
        impls = ("ours",) if queries else ("ours", "pml")
        runs = {
            impl: [run_child(impl, dataset, args.quick) for _ in range(args.repeats)]
            for impl in impls
        }
        name = f"{n:,} x {dim}" + (f", {queries:,} queries" if queries else " leave-one-out")
        for impl, results in runs.items():
            failed = [r for r in results if "error" in r]
            if failed:
                lines.append(f"| {name} | {impl} | failed: {failed[0]['error']} | | | | | |")
                print(lines[-1], flush=True)
                continue
            v = results[0]["values"]
            lines.append(
                f"| {name} | {impl} | {statistics.median(r['seconds'] for r in results):.2f} "
                f"| {max(r['peak_rss_mb'] for r in results):.0f} "
                f"| {results[0]['data_rss_mb']:.0f} "
                f"| {v['precision_at_1']:.6f} | {v['r_precision']:.6f} "
                f"| {v['mean_average_precision_at_r']:.6f} |"
            )
            print(lines[-1], flush=True)
        ours, pml = runs.get("ours", []), runs.get("pml", [])
        if pml and not any("error" in r for r in ours + pml):
            same = all(
                abs(ours[0]["values"][k] - pml[0]["values"][k]) <= 1e-6 for k in pml[0]["values"]
            )
            t = statistics.median(r["seconds"] for r in ours) / statistics.median(
                r["seconds"] for r in pml
            )
            m = max(r["peak_rss_mb"] for r in ours) / max(r["peak_rss_mb"] for r in pml)
            ratios.append(
                f"- {name}: time ours/PML = {t:.3f}, peak RSS ours/PML = {m:.3f}, "
                f"values identical within 1e-6: {same}"
            )
    text = "\n".join([*lines, "", *ratios, ""])
    print(text)
    if args.record:
        with args.record.open("a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

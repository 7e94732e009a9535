"""Benchmark: the bundle's FAISS backend against Milvus Lite on the same items and queries.

For each size n: synthetic clustered unit vectors (``bench_search.make_vectors``) go into an
item store (SQLite, as a bundle holds them) with one label per 100 items; the FAISS backends
(``IndexedItems``: Flat, the default, and HNSW32) and a Milvus Lite collection filled by
``push_store`` (what ``retrieval push`` runs; its index chosen from n by ``choose_index``)
answer the same queries, one query per call as the service sends them. Reported: push
throughput (vectors/s), time to the first answer after the push, QPS and p50 / p99 latency
of single-query searches (k=10), and recall@10 against exact search (numpy, float32).

Each size runs in a fresh subprocess (own memory and peak RSS).

    python scripts/bench_backends.py                       # 100k and 1M, d=128
    python scripts/bench_backends.py --quick               # 5,000 vectors: checks the logic
    python scripts/bench_backends.py --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from _machine import cpu_model  # noqa: E402
from bench_search import make_vectors  # noqa: E402

K = 10


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def exact_top_k(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """(nq, k) ids (1-based, as the store numbers items) of the exact inner-product top k."""
    out = np.empty((len(xq), k), np.int64)
    for start in range(0, len(xq), 100):
        scores = xq[start : start + 100] @ xb.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, 1).argsort(axis=1)[:, ::-1]
        out[start : start + 100] = np.take_along_axis(part, order, 1) + 1
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def time_queries(search: Any, xq: np.ndarray, warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Latencies (s) of one-query searches and their ids, after ``warmup`` untimed ones."""
    for row in range(min(warmup, len(xq))):
        search(xq[row : row + 1])
    took, ids = np.empty(len(xq)), np.empty((len(xq), K), np.int64)
    for row in range(len(xq)):
        start = time.perf_counter()
        _, found = search(xq[row : row + 1])
        took[row] = time.perf_counter() - start
        ids[row, : found.shape[1]] = found[0]
    return took, ids


def summary(name: str, took: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    return {
        "backend": name,
        "qps": len(took) / float(took.sum()),
        "p50_ms": 1000 * float(np.percentile(took, 50)),
        "p99_ms": 1000 * float(np.percentile(took, 99)),
        "recall@10": recall(ids, truth),
    }


def child(n: int, d: int, nq: int, faiss: list[str], warmup: int) -> dict[str, Any]:
    from retrieval.backends import parse_backend
    from retrieval.backends.milvus import MilvusBackend, push_store
    from retrieval.bundle.item_table import ItemTable
    from retrieval.bundle.items import IndexedItems
    from retrieval.bundle.records import ItemRecord

    xb, xq = make_vectors(n, d, nq)
    truth = exact_top_k(xb, xq, K)
    result: dict[str, Any] = {"n": n, "d": d, "nq": nq, "rows": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        store = ItemTable.create(root / "items.sqlite", d)
        for lo in range(0, n, 10_000):
            hi = min(n, lo + 10_000)
            records = [
                ItemRecord(f"/images/{i:08d}.jpg", f"label{i // 100}") for i in range(lo, hi)
            ]
            store.add(records, xb[lo:hi])
        result["store_s"] = time.perf_counter() - start
        log(f"n={n}: item store written in {result['store_s']:.1f} s")
        for factory in faiss:
            folder = root / f"faiss_{factory}"
            start = time.perf_counter()
            params = "efSearch=128" if factory.startswith("HNSW") else ""  # as Milvus's ef
            items = IndexedItems.create(folder, d, factory, params, snapshot_every=None)
            for lo in range(0, n, 50_000):
                hi = min(n, lo + 50_000)
                records = [ItemRecord(f"/images/{i:08d}.jpg") for i in range(lo, hi)]
                items.add(records, xb[lo:hi])
            build = time.perf_counter() - start
            took, ids = time_queries(lambda q, items=items: items.search(q, K), xq, warmup)
            row = summary(f"FAISS {factory} {params}".strip(), took, ids, truth)
            row["build_s"] = build
            result["rows"].append(row)
            log(f"n={n}: {row}")
            items.close()
        spec = parse_backend(f"milvus-lite:{root / 'lite'}")
        start = time.perf_counter()
        report = push_store(store, spec, batch_size=1000)
        push_s = time.perf_counter() - start
        assert report.total == n, report
        backend = MilvusBackend.connect(spec, d)
        start = time.perf_counter()
        backend.search(xq[:1], K)
        first_s = time.perf_counter() - start
        took, ids = time_queries(lambda q: backend.search(q, K), xq, warmup)
        row = summary(f"Milvus Lite {report.index['index_type']}", took, ids, truth)
        row.update(
            push_s=push_s,
            push_per_s=n / push_s,
            first_search_s=first_s,
            index=backend.describe(),
        )
        result["rows"].append(row)
        log(f"n={n}: {row}")
        backend.close()
        store.close()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> list[str]:
    from retrieval.backends.milvus import choose_index

    lines = [
        f"# Search backends: FAISS (bundle) vs Milvus Lite, d={args.dim}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"faiss-cpu {version('faiss-cpu')}, pymilvus {version('pymilvus')}, "
        f"milvus-lite {version('milvus-lite')}",
        f"- command: `python scripts/bench_backends.py {' '.join(sys.argv[1:])}`",
        f"- {args.queries} queries, one per call, k={K}, after {args.warmup} untimed; recall@10 "
        "against exact float32 search; wall time of the run "
        f"{wall / 60:.1f} min",
        f"- load average (1 min) at the start {args.load_before:.2f}, at the end "
        f"{os.getloadavg()[0]:.2f} (other processes share these 2 cores)",
        "",
        "| n | backend | index | QPS | p50 ms | p99 ms | recall@10 | build / push |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        choice = choose_index(r["n"])
        for row in r["rows"]:
            if row["backend"].startswith("Milvus"):
                index = f"{choice.index_type} {choice.params}, search {choice.search}"
                build = (
                    f"push {row['push_s']:.1f} s = {row['push_per_s']:,.0f} vectors/s; "
                    f"first search {row['first_search_s']:.1f} s"
                )
            else:
                index = row["backend"].removeprefix("FAISS ")
                build = f"build {row['build_s']:.1f} s"
            lines.append(
                f"| {r['n']:,} | {'Milvus Lite' if 'Lite' in row['backend'] else 'FAISS'} "
                f"| {index} | {row['qps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                f"| {row['recall@10']:.4f} | {build} |"
            )
        lines.append(
            f"| {r['n']:,} | (process) | | | | | | item store {r['store_s']:.1f} s, "
            f"peak RSS {r['peak_rss_mb']:,.0f} MB |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--faiss", nargs="+", default=["Flat", "HNSW32"])
    parser.add_argument("--quick", action="store_true", help="5,000 vectors, 200 queries")
    parser.add_argument("--record", default=None, help="append the report to this file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.warmup = [5_000], 200, 10
    if args.child is not None:
        out = child(args.child, args.dim, args.queries, args.faiss, args.warmup)
        print(json.dumps(out))
        return
    args.load_before = os.getloadavg()[0]
    started, results = time.perf_counter(), []
    for n in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--child",
            str(n),
            "--dim",
            str(args.dim),
            "--queries",
            str(args.queries),
            "--warmup",
            str(args.warmup),
            "--faiss",
            *args.faiss,
        ]
        log(f"n={n}: starting")
        done = subprocess.run(command, capture_output=False, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            log(f"n={n}: the child failed with exit code {done.returncode}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    text = "\n".join(report(results, args, time.perf_counter() - started))
    print(text)
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()

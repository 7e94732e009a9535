"""Benchmark: the bundle's FAISS backend against Milvus Lite and a Milvus server on the same
items and queries.

For each size n: synthetic clustered unit vectors (``bench_search.make_vectors``) go into an
item store (SQLite, as a bundle holds them) with one label per 100 items; the FAISS backends
(``IndexedItems``: Flat, the default, and HNSW32), a Milvus Lite collection and a collection on
a Milvus standalone server (the ``milvus`` package's 2.3 on loopback, started once for the
run; its index built before searching), each filled by ``push_store`` (what ``retrieval push``
runs; the index chosen from n by ``choose_index``), answer the same queries, one query per
call as the service sends them, from 1, 4 and 16 concurrent clients (threads, each its own
share of the queries). Reported: push throughput (vectors/s), the server's index build after
the push, QPS and p50 / p99 latency of single-query searches (k=10) per client count, and
recall@10 against exact search (numpy, float32).

Each size runs in a fresh subprocess (own memory and peak RSS).

    python scripts/bench_backends.py                       # 100k and 1M, d=128
    python scripts/bench_backends.py --quick               # 5,000 vectors: checks the logic
    python scripts/bench_backends.py --engines lite        # without the server
    python scripts/bench_backends.py --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
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


def concurrent_queries(
    search: Any, xq: np.ndarray, clients: int, warmup: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Latencies (s) and ids of one-query searches from ``clients`` threads at once (client c
    sends queries c, c + clients, ...), and the wall time of them all."""
    time_queries(search, xq[: min(warmup, len(xq))], 0)
    took, ids = np.empty(len(xq)), np.empty((len(xq), K), np.int64)

    def client(first: int) -> None:
        for row in range(first, len(xq), clients):
            start = time.perf_counter()
            _, found = search(xq[row : row + 1])
            took[row] = time.perf_counter() - start
            ids[row, : found.shape[1]] = found[0]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return took, ids, time.perf_counter() - start


def summary(name: str, took: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    return {
        "backend": name,
        "qps": len(took) / float(took.sum()),
        "p50_ms": 1000 * float(np.percentile(took, 50)),
        "p99_ms": 1000 * float(np.percentile(took, 99)),
        "recall@10": recall(ids, truth),
    }


def measure(
    name: str, search: Any, xq: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per client count: QPS of them all together, per-query latencies, recall."""
    rows = []
    for clients in args.clients:
        took, ids, wall = concurrent_queries(search, xq, clients, args.warmup)
        row = summary(name, took, ids, truth)
        row.update(clients=clients, qps=len(xq) / wall)
        rows.append(row)
        log(f"{name}: {row}")
    return rows


def faiss_rows(
    root: Path, xb: np.ndarray, xq: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    from retrieval.bundle.items import IndexedItems
    from retrieval.bundle.records import ItemRecord

    rows = []
    for factory in args.faiss:
        start = time.perf_counter()
        params = "efSearch=128" if factory.startswith("HNSW") else ""  # as Milvus's ef
        folder = root / f"faiss_{factory}"
        items = IndexedItems.create(folder, xb.shape[1], factory, params, snapshot_every=None)
        for lo in range(0, len(xb), 50_000):
            hi = min(len(xb), lo + 50_000)
            items.add([ItemRecord(f"/images/{i:08d}.jpg") for i in range(lo, hi)], xb[lo:hi])
        build = time.perf_counter() - start
        name = f"FAISS {factory} {params}".strip()
        for row in measure(name, lambda q, items=items: items.search(q, K), xq, truth, args):
            rows.append({**row, "build_s": build})
        items.close()
    return rows


def wait_for_index(backend: Any, n: int) -> float:
    """Seconds until the server has indexed all ``n`` rows of the backend's collection."""
    start = time.perf_counter()
    while True:
        index = backend._client.describe_index(backend.spec.collection, "vector")
        if int(index.get("indexed_rows", 0)) >= n:
            return time.perf_counter() - start
        time.sleep(1)


def milvus_rows(
    store: Any, target: str, xq: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Push the store into ``target``, wait for a server's index, then search it."""
    from retrieval.backends import parse_backend
    from retrieval.backends.milvus import MilvusBackend, push_store

    spec = parse_backend(target)
    start = time.perf_counter()
    report = push_store(store, spec, batch_size=1000)
    push_s = time.perf_counter() - start
    assert report.total == store.active_count, report
    backend = MilvusBackend.connect(spec, store.dim, timeout_s=600)
    server = spec.kind == "milvus"
    index_s = wait_for_index(backend, store.active_count) if server else 0.0
    name = f"Milvus {'server ' + backend.version.text if server else 'Lite'}"
    extra = {"push_s": push_s, "push_per_s": store.active_count / push_s, "index_s": index_s}
    rows = measure(name, lambda q: backend.search(q, K), xq, truth, args)
    rows = [{**row, **extra} for row in rows]
    backend.close()
    return rows


def fresh_server_collection(address: str, name: str) -> str:
    """``milvus://ADDRESS/NAME`` with any collection of that name dropped first."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=f"http://{address}")
    for old in (name, f"{name}__removed"):
        if client.has_collection(old):
            client.drop_collection(old)
    client.close()
    return f"milvus://{address}/{name}"


def child(n: int, args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.bundle.item_table import ItemTable
    from retrieval.bundle.records import ItemRecord

    xb, xq = make_vectors(n, args.dim, args.queries)
    truth = exact_top_k(xb, xq, K)
    result: dict[str, Any] = {"n": n, "d": args.dim, "nq": args.queries, "rows": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        store = ItemTable.create(root / "items.sqlite", args.dim)
        for lo in range(0, n, 10_000):
            hi = min(n, lo + 10_000)
            records = [
                ItemRecord(f"/images/{i:08d}.jpg", f"label{i // 100}") for i in range(lo, hi)
            ]
            store.add(records, xb[lo:hi])
        result["store_s"] = time.perf_counter() - start
        log(f"n={n}: item store written in {result['store_s']:.1f} s")
        result["rows"] += faiss_rows(root, xb, xq, truth, args)
        if "lite" in args.engines:
            result["rows"] += milvus_rows(store, f"milvus-lite:{root / 'lite'}", xq, truth, args)
        if args.server:
            target = fresh_server_collection(args.server, f"bench_{n}")
            result["rows"] += milvus_rows(store, target, xq, truth, args)
        store.close()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _versions() -> str:
    names = ("faiss-cpu", "pymilvus", "milvus-lite", "milvus")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def report(results: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> list[str]:
    from retrieval.backends.milvus import choose_index

    lines = [
        f"# Search backends: FAISS (bundle), Milvus Lite and a Milvus server, d={args.dim}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{_versions()}",
        f"- command: `python scripts/bench_backends.py {' '.join(sys.argv[1:])}`",
        f"- {args.queries} queries, one per call, k={K}, from {args.clients} concurrent clients "
        f"(threads), after {args.warmup} untimed; QPS of all clients together; recall@10 "
        f"against exact float32 search; wall time of the run {wall / 60:.1f} min",
        f"- load average (1 min) at the start {args.load_before:.2f}, at the end "
        f"{os.getloadavg()[0]:.2f} (other processes share these 2 cores)",
        "",
        "| n | backend | index | clients | QPS | p50 ms | p99 ms | recall@10 | build / push |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        choice = choose_index(r["n"])
        for row in r["rows"]:
            if row["backend"].startswith("Milvus"):
                index = f"{choice.index_type} {choice.params}, search {choice.search}"
                build = f"push {row['push_s']:.1f} s = {row['push_per_s']:,.0f} vectors/s"
                if row["index_s"]:
                    build += f"; index built {row['index_s']:.0f} s after"
                backend = row["backend"]
            else:
                index = row["backend"].removeprefix("FAISS ")
                build, backend = f"build {row['build_s']:.1f} s", "FAISS"
            lines.append(
                f"| {r['n']:,} | {backend} | {index} | {row['clients']} | {row['qps']:,.0f} "
                f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['recall@10']:.4f} "
                f"| {build} |"
            )
        lines.append(
            f"| {r['n']:,} | (process) | | | | | | | item store {r['store_s']:.1f} s, "
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
    parser.add_argument("--engines", nargs="+", default=["lite", "server"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--server", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="5,000 vectors, 200 queries")
    parser.add_argument("--record", default=None, help="append the report to this file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.warmup = [5_000], 200, 10
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    args.load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if "server" in args.engines:
            args.server = stack.enter_context(_server()).address
        started, results = time.perf_counter(), run_sizes(args)
    text = "\n".join(report(results, args, time.perf_counter() - started))
    print(text)
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")


@contextlib.contextmanager
def _server() -> Any:
    """A Milvus standalone server for the run, in a temporary folder."""
    from retrieval.backends.milvus.standalone import StandaloneServer

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        server = StandaloneServer(Path(tmp) / "milvus")
        log(f"Milvus server at {server.start()}")
        try:
            yield server
        finally:
            server.stop()


def run_sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each size in its own process; the results of those that finished."""
    results = []
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
            "--engines",
            *args.engines,
            "--clients",
            *[str(c) for c in args.clients],
            *(["--server", args.server] if args.server else []),
        ]
        log(f"n={n}: starting")
        done = subprocess.run(command, capture_output=False, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            log(f"n={n}: the child failed with exit code {done.returncode}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


if __name__ == "__main__":
    main()

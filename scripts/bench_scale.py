"""Benchmark: building IVF-PQ indexes from embedding shards on disk, at 1,000,000 and
10,000,000 vectors, chunk by chunk as ``export.py shards=`` builds them (``retrieval.index.shards``:
a training sample across the shards, then their rows in chunks); then search QPS and
recall@10 against exact search, per nprobe. ``--part bundle``: the same shards streamed into
a whole bundle (items.sqlite + index) by ``write_bundle_chunks``, as ``export.py shards=``.

Per size, every step runs in a fresh subprocess, so each reports its own peak RSS
(``ru_maxrss`` = the kernel's VmHWM, and the maximum of VmRSS sampled every 50 ms):

1. generate: synthetic clustered unit vectors (as bench_search.py: 1000 gaussian clusters in a
   random 32-d subspace plus noise) written chunk by chunk into ``shard-NNNNN.npy`` files;
2. truth: exact top-10 of 1,000 queries by brute force over the shards, chunk by chunk;
3. build (per factory): train on a sample drawn across the shards, add them chunk by chunk;
4. search (per factory): per nprobe (and ``k_factor_rf`` for ``Refine(...)`` indexes), batch
   QPS (1,000 queries per call, all threads) and recall@10.

    python scripts/bench_scale.py                      # 1M and 10M: 10-25 min on 2 cores
    python scripts/bench_scale.py --sizes 1000000 --factory "IVF4096,PQ32np,Refine(SQ8)"
    python scripts/bench_scale.py --quick              # 100k, checks the logic (~1 min)
    python scripts/bench_scale.py --part bundle --sizes 10000000   # ~10 min, 13 GB of disk
    python scripts/bench_scale.py --part ddp           # runs scripts/bench_ddp.py (if present)
    python scripts/bench_scale.py --record experiments/FILE.md   # also append the report

The files go to ``--workdir`` (default: a temporary folder, deleted at the end; 10M x 128
float32 shards are 5.1 GB, a 10M bundle 8.2 GB more): check ``df -h`` first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _machine import cpu_model  # noqa: E402  (scripts/ is on sys.path)

K = 10
CLUSTERS, LATENT_DIM, AMBIENT_NOISE = 1000, 32, 0.3
NPROBE = (8, 16, 32, 64, 128)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class PeakRss:
    """Samples this process's VmRSS every ``interval`` s in a thread; ``peak_mb`` after stop."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return {"peak_rss_mb": round(hwm, 1), "sampled_rss_mb": round(self.peak_kb / 1024, 1)}


# ---------------------------------------------------------------- children


def child_generate(a: argparse.Namespace) -> dict[str, Any]:
    """Shards of ``a.shard_rows`` rows, generated 100k rows at a time; queries.npy."""
    from retrieval.infra.io import atomic_write

    rng, d, latent = np.random.default_rng(0), a.dim, min(LATENT_DIM, a.dim)
    centres = rng.standard_normal((CLUSTERS, latent)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((d, latent)))[0].T.astype(np.float32)
    noise = np.float32(AMBIENT_NOISE * math.sqrt(latent / d))

    def sample(count: int, gen: np.random.Generator) -> np.ndarray:
        z = centres[gen.integers(CLUSTERS, size=count)] + gen.standard_normal((count, latent))
        x = z.astype(np.float32) @ basis + noise * gen.standard_normal((count, d), np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    folder, start, shard = Path(a.dir), time.perf_counter(), 0
    for first in range(0, a.n, a.shard_rows):
        rows = min(a.shard_rows, a.n - first)
        gen = np.random.default_rng([1, shard])
        with atomic_write(folder / f"shard-{shard:05d}.npy") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": "<f4", "fortran_order": False, "shape": (rows, d)}
            )
            for done in range(0, rows, 100_000):
                handle.write(sample(min(100_000, rows - done), gen).tobytes())
        shard += 1
    np.save(folder / "queries.npy", sample(a.queries, np.random.default_rng([2, 0])))
    return {"generate_s": time.perf_counter() - start, "shards": shard}


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.npy"))


def child_truth(a: argparse.Namespace) -> dict[str, Any]:
    """Exact top-K of the queries over all shards, one Flat chunk at a time, merged."""
    from retrieval.index import EmbeddingIndex
    from retrieval.index.shards import iter_chunks

    folder = Path(a.dir)
    xq = np.load(folder / "queries.npy")
    best_d = np.full((len(xq), K), -np.inf, np.float32)
    best_i = np.full((len(xq), K), -1, np.int64)
    start, offset = time.perf_counter(), 0
    for chunk in iter_chunks(_files(folder), a.chunk_rows):
        flat = EmbeddingIndex(chunk.shape[1], "Flat", use_gpu=False)
        flat.add(chunk)
        d, i = flat.search(xq, K)
        all_d, all_i = np.hstack([best_d, d]), np.hstack([best_i, i + offset])
        order = np.argsort(-all_d, axis=1, kind="stable")[:, :K]
        best_d, best_i = np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)
        offset += len(chunk)
    np.save(folder / "truth.npy", best_i)
    return {"truth_s": time.perf_counter() - start, "rows": offset}


def child_build(a: argparse.Namespace) -> dict[str, Any]:
    """The chunked build (``training_sample``, ``train``, ``add`` per ``iter_chunks``), timed
    per phase."""
    from retrieval.index import EmbeddingIndex
    from retrieval.index.shards import iter_chunks, training_sample

    folder, files = Path(a.dir), _files(Path(a.dir))
    dim = np.load(files[0], mmap_mode="r").shape[1]
    t0 = time.perf_counter()
    index = EmbeddingIndex(dim, a.factory, use_gpu=False)
    sample = training_sample(files, a.max_train, seed=0)
    t1 = time.perf_counter()
    index.train(sample, max_train=len(sample))
    del sample
    t2 = time.perf_counter()
    for chunk in iter_chunks(files, a.chunk_rows):
        index.add(chunk)
    t3 = time.perf_counter()
    index.save(folder / f"{a.factory}.faiss")
    return {
        "sample_s": t1 - t0,
        "train_s": t2 - t1,
        "add_s": t3 - t2,
        "build_s": t3 - t0,
        "ntotal": index.ntotal,
        "bytes_per_vector": index.bytes_per_vector,
        "index_mb": (folder / f"{a.factory}.faiss").stat().st_size / 2**20,
    }


def child_search(a: argparse.Namespace) -> dict[str, Any]:
    """Batch QPS and recall@K per nprobe (each search repeated until >= 1 s)."""
    from retrieval.index import EmbeddingIndex, knn_recall

    folder = Path(a.dir)
    xq, truth = np.load(folder / "queries.npy"), np.load(folder / "truth.npy")
    rows = []
    for nprobe in NPROBE:
        params = f"nprobe={nprobe}"
        params += f",k_factor_rf={a.refine_k}" if "Refine" in a.factory else ""
        index = EmbeddingIndex.load(
            folder / f"{a.factory}.faiss", use_gpu=False, search_params=params
        )
        _, ids = index.search(xq[:50], K)  # warm-up
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < 1.0:
            _, ids = index.search(xq, K)
            runs += 1
        elapsed = (time.perf_counter() - start) / runs
        rows.append({"params": params, "qps": len(xq) / elapsed, "recall": knn_recall(ids, truth)})
        del index
    return {"search": rows}


def child_bundle(a: argparse.Namespace) -> dict[str, Any]:
    """Shards in embed.py's format (100k rows each, random unit vectors, fake image items),
    streamed into a bundle with a 128-d (random) EfficientNet-Lite0 model, then loaded by
    Retriever: each of 5 stored vectors must find its own item."""
    from retrieval.bundle.writer import GalleryItem, write_bundle_chunks
    from retrieval.index import ShardSet
    from retrieval.index.shards import (
        PLAN_FILE,
        ShardContent,
        ShardItem,
        training_sample,
        write_shard,
    )
    from retrieval.models import Embedder, create_backbone
    from retrieval.search import Retriever

    folder, rows, rng = Path(a.dir), 100_000, np.random.default_rng(0)
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for s in range(-(-a.n // rows)):
        m = min(rows, a.n - s * rows)
        x = rng.standard_normal((m, a.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        uri = "/images/{:05d}/{:06d}.jpg"
        items = [
            ShardItem(uri.format(s, i), f"l{i % 1000}", {}, f"{s * rows + i:064x}")
            for i in range(m)
        ]
        write_shard(shards, s, ShardContent(x, items), a.dim)
    plan = {"format": "retrieval-shards", "dim": a.dim, "num_shards": s + 1, "source": "synthetic"}
    (shards / PLAN_FILE).write_text(json.dumps(plan))
    t1 = time.perf_counter()
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    embedder = Embedder(backbone, embedding_dim=a.dim, pooling="avg").eval()
    model_config = {
        "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
        "embedder": {"embedding_dim": a.dim, "pooling": "avg", "head_bn": False},
    }
    shard_set = ShardSet.open(shards)
    chunks = (
        ([GalleryItem(i.uri, i.label, dict(i.extra), i.sha256) for i in items], vectors)
        for items, vectors in shard_set.iter_chunks(a.chunk_rows)
    )
    bundle = write_bundle_chunks(
        folder / "bundle",
        embedder,
        model_config,
        embedder.preprocessing.with_size(64),
        chunks,
        a.dim,
        train_vectors=training_sample(shard_set.files, a.max_train),
        max_train=a.max_train,
        factory=a.factory,
    )
    t2 = time.perf_counter()
    with Retriever.load(bundle, runtime="onnx") as retriever:
        t3 = time.perf_counter()
        hits = retriever.search(np.array(np.load(shard_set.files[-1], mmap_mode="r")[:5]), k=1)
    found = [h[0].uri for h in hits] == [uri.format(s, i) for i in range(5)]
    return {
        "shards_s": t1 - t0,
        "bundle_s": t2 - t1,
        "load_s": t3 - t2,
        "self_found": found,
        "bundle_gb": sum(f.stat().st_size for f in bundle.iterdir()) / 1e9,
    }


CHILDREN = {
    "generate": child_generate,
    "truth": child_truth,
    "build": child_build,
    "search": child_search,
    "bundle": child_bundle,
}


# ---------------------------------------------------------------- driver


def run_child(
    a: argparse.Namespace, step: str, folder: Path, n: int, factory: str = ""
) -> dict[str, Any]:
    options = ["--child", step, "--dir", folder, "--n", n, "--dim", a.dim]
    options += ["--max-train", a.max_train, "--chunk-rows", a.chunk_rows]
    options += ["--shard-rows", a.shard_rows, "--queries", a.queries, "--refine-k", a.refine_k]
    options += ["--factory", factory] if factory else []
    log(f"n={n:,}: {step} {factory}")
    command = [sys.executable, __file__, *map(str, options)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"step {step} at n={n} failed with exit status {out.returncode}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"n={n:,}: {step} {factory} done: {result}")
    return result


def bench_size(a: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    """Generate and score n vectors, then build and search each factory; files deleted after."""
    folder = work / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result: dict[str, Any] = {"n": n}
        result["generate"] = run_child(a, "generate", folder, n)
        result["truth"] = run_child(a, "truth", folder, n)
        result["disk_gb"] = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
        result["indexes"] = [
            {
                "factory": factory,
                "build": run_child(a, "build", folder, n, factory),
                "search": run_child(a, "search", folder, n, factory),
            }
            for factory in a.factory
        ]
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def report(a: argparse.Namespace, results: list[dict[str, Any]], started: str) -> list[str]:
    from importlib.metadata import version

    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    factories = ", ".join(f"`{f}`" for f in a.factory)
    lines = [
        f"# bench_scale on {platform.node()}, {os.cpu_count()} CPUs, {started}",
        "",
        f"- command: `python scripts/bench_scale.py {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; shared and noisy",
        f"- python {platform.python_version()}, faiss {version('faiss-cpu')}, "
        f"numpy {np.__version__}",
        f"- data: {a.dim}-d unit vectors, {CLUSTERS} gaussian clusters in a random {LATENT_DIM}-d "
        f"subspace + noise; .npy shards of {a.shard_rows:,} rows; {a.queries} queries from the "
        "same mixture, not in the base; exact top-10 by brute force over the shards",
        f"- indexes: {factories}, each trained on {a.max_train:,} rows sampled across the "
        f"shards, then the shards added {a.chunk_rows:,} rows at a time "
        "(retrieval.index.shards); every step in its own process: peak RSS = ru_maxrss "
        "(VmHWM), sampled = max VmRSS every 50 ms",
        "",
        "| n | index | build s (sample + train + add) | build peak RSS MB (sampled) | "
        "index MB | bytes/vector |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in results:
        for x in r["indexes"]:
            b = x["build"]
            lines.append(
                f"| {r['n']:,} | {x['factory']} | {b['build_s']:.0f} ({b['sample_s']:.0f} + "
                f"{b['train_s']:.0f} + {b['add_s']:.0f}) | {b['peak_rss_mb']:,.0f} "
                f"({b['sampled_rss_mb']:,.0f}) | {b['index_mb']:,.0f} | "
                f"{b['bytes_per_vector']:.0f} |"
            )
    lines += ["", "| n | generate s | shards GB | exact top-10 s | exact top-10 peak RSS MB |"]
    lines += ["|---:|---:|---:|---:|---:|"]
    for r in results:
        g, t = r["generate"], r["truth"]
        lines.append(
            f"| {r['n']:,} | {g['generate_s']:.0f} | {r['disk_gb']:.2f} | {t['truth_s']:.0f} | "
            f"{t['peak_rss_mb']:,.0f} |"
        )
    lines += [
        "",
        "| n | index | search params | QPS (1,000 queries per call, all threads) | recall@10 |",
    ]
    lines += ["|---:|---|---:|---:|---:|"]
    for r in results:
        for x in r["indexes"]:
            for row in x["search"]["search"]:
                lines.append(
                    f"| {r['n']:,} | {x['factory']} | {row['params']} | {row['qps']:,.0f} | "
                    f"{row['recall']:.4f} |"
                )
    return lines


def bench_bundle(a: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    folder = work / f"bundle{n}"
    try:
        return {"n": n, **run_child(a, "bundle", folder, n, a.factory[0])}
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


def bundle_report(a: argparse.Namespace, results: list[dict[str, Any]], started: str) -> list[str]:
    lines = [
        f"# bench_scale --part bundle on {platform.node()}, {os.cpu_count()} CPUs, {started}",
        "",
        f"- command: `python scripts/bench_scale.py {' '.join(sys.argv[1:])}`",
        f"- shards of 100,000 random {a.dim}-d unit vectors with fake image items, streamed "
        f"{a.chunk_rows:,} rows at a time by write_bundle_chunks into a `{a.factory[0]}` bundle "
        f"(trained on {a.max_train:,} rows sampled across shards); one process: peak RSS "
        "includes the model export (ONNX, TorchScript) and Retriever.load",
        "",
        "| n | write shards s | write bundle s | bundle GB | Retriever.load s | "
        "stored vectors find their item | peak RSS MB (sampled) |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']:,} | {r['shards_s']:.0f} | {r['bundle_s']:.0f} | {r['bundle_gb']:.2f} | "
            f"{r['load_s']:.1f} | {r['self_found']} | {r['peak_rss_mb']:,.0f} "
            f"({r['sampled_rss_mb']:,.0f}) |"
        )
    return lines


def run_ddp(extra: list[str]) -> int:
    script = ROOT / "scripts" / "bench_ddp.py"
    if not script.is_file():
        log(f"--part ddp: {script} does not exist (yet): nothing run")
        return 1
    return subprocess.run([sys.executable, str(script), *extra]).returncode


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", choices=("scale", "bundle", "ddp"), default="scale")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument(
        "--quick", action="store_true", help="100,000 vectors, IVF1024: checks the logic"
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--factory", nargs="+", default=None, help="default IVF4096,PQ{32,64}np")
    p.add_argument("--max-train", type=int, default=200_000)
    p.add_argument("--chunk-rows", type=int, default=100_000)
    p.add_argument("--shard-rows", type=int, default=500_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--refine-k", type=int, default=4, help="k_factor_rf of Refine(...) indexes")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the shards and index")
    p.add_argument("--record", type=Path, default=None, help="append the report to this file")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a, extra = p.parse_known_args()
    if a.child and a.factory:
        a.factory = a.factory[0]
    elif not a.factory:
        nlist = 1024 if a.quick else 4096
        a.factory = [f"IVF{nlist},PQ32np", f"IVF{nlist},PQ64np"]
    a.sizes = a.sizes or ([100_000] if a.quick else [1_000_000, 10_000_000])
    return a, extra


def main() -> None:
    a, extra = parse_args()
    if a.child:
        with PeakRss() as rss:
            result = CHILDREN[a.child](a)
        print(json.dumps({**result, **rss.report()}))
        return
    if a.part == "ddp":
        raise SystemExit(run_ddp(extra))
    if extra:
        raise SystemExit(f"unknown arguments {extra}")
    started = datetime.datetime.now().isoformat(timespec="seconds")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    try:
        if a.part == "bundle":
            lines = bundle_report(a, [bench_bundle(a, n, work) for n in a.sizes], started)
        else:
            lines = report(a, [bench_size(a, n, work) for n in a.sizes], started)
    finally:
        if a.workdir is None and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    if a.record:
        with open(a.record, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

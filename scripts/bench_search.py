"""Benchmark: (a) indexing throughput, JPEG folder -> searchable vectors, for four model
execution paths; (b) search latency, throughput, memory and recall of exact and approximate
indexes on synthetic clustered vectors, with the goal line checked at 200,000 vectors.

Each part, and each (n, d) case of (b), runs in a fresh subprocess (own peak RSS, thread
settings and memory). Times are medians over ``--repeats`` runs after untimed warm-up runs.

    python scripts/bench_search.py                 # full: about 45-60 min on 2 quiet cores
    python scripts/bench_search.py --quick         # small sizes, 96 px: checks the logic (~40 s)
    python scripts/bench_search.py --part b --sizes 200000     # only the goal size of (b)
    python scripts/bench_search.py --record experiments/FILE.md     # also append the report
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _machine import cpu_model  # noqa: E402  (scripts/ is on sys.path)

K = 10  # recall@K and neighbours per query
BATCH = 32  # images per model call in (a)
BACKBONE, EMBEDDING_DIM, POOLING = "tf_efficientnet_lite0", 512, "gem"
PATHS = ("eager", "channels_last", "torchscript", "onnx")
EF_SEARCH = (16, 32, 64, 128, 256)
NPROBE = (4, 8, 16, 32, 64, 128)
WARMUP_QUERIES = 10  # extra queries, searched untimed before each latency and batch run
MIN_LATENCY_QUERIES = 100  # timed at least this many single queries, even over the budget
HNSW_GROWTH = 1.2  # HNSW build time per vector grows ~log n: 10x more vectors, ~1.2x per vector
GOAL_RECALL, GOAL_SPEEDUP = 0.95, 15.0
CLUSTERS, LATENT_DIM, AMBIENT_NOISE = 1000, 32, 0.3
PRESETS = {  # mode -> defaults of the options left unset
    "full": {
        "images": 400,
        "warmup_images": 64,
        "input_size": None,
        "repeats": 3,
        "sizes": [100_000, 200_000, 1_000_000],
        "dims": [128, 512],
        "goal_n": 200_000,
        "queries": 1000,
        "budget_s": 900.0,
        "latency_budget_s": 30.0,
        "batch_min_s": 1.0,  # batch searches repeat (>= --repeats times) until this long in all
    },
    "quick": {
        "images": 36,  # a full batch and a partial one
        "warmup_images": 4,
        "input_size": 96,
        "repeats": 1,
        "sizes": [2_000, 4_000, 8_000],
        "dims": [32, 64],
        "goal_n": 4_000,
        "queries": 100,
        "budget_s": 60.0,
        "latency_budget_s": 1.0,
        "batch_min_s": 0.05,
    },
}


class SkipCase(Exception):
    """A case not run (its reason is the message)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------- (a) indexing throughput


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` demo scenes, 500 x 375 px (centre rows of a 500 px render), JPEG quality 90."""
    from retrieval.datasets.demo import render_demo_image

    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        image = render_demo_image(seed=0, label=i % 50, index=i, image_size=500)
        path = folder / f"{i:05d}.jpg"
        image.crop((0, 62, 500, 437)).save(path, quality=90)
        paths.append(path)
    return paths


def embedders(input_size: int | None) -> tuple[Any, Any, Any]:
    """The eager and channels-last Embedders (same weights, seeded head) and the preprocessing."""
    import torch

    from retrieval.models import Embedder, create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE, pretrained=True)
    twin = copy.deepcopy(backbone)
    eager = Embedder(backbone, EMBEDDING_DIM, POOLING, channels_last=False).eval()
    fast = Embedder(twin, EMBEDDING_DIM, POOLING, channels_last=True).eval()
    fast.load_state_dict(eager.state_dict())  # copy_ keeps the channels-last strides
    return eager, fast, eager.preprocessing.with_size(input_size)


def torch_embed(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def embed(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return embed


def index_images(
    paths: Sequence[Path], folder: Path, preprocess: Any, embed: Callable
) -> tuple[dict[str, float], np.ndarray]:
    """Open, preprocess, embed and add ``paths`` in batches of BATCH to a new IndexedItems in
    ``folder``; return the seconds of each stage and the vectors."""
    from retrieval.bundle.items import IndexedItems
    from retrieval.bundle.records import ItemRecord
    from retrieval.data.images import open_rgb

    seconds = {"decode": 0.0, "model": 0.0, "index": 0.0}
    parts = []
    start = time.perf_counter()
    items = IndexedItems.create(folder, EMBEDDING_DIM)
    seconds["index"] += time.perf_counter() - start
    for first in range(0, len(paths), BATCH):
        chunk = paths[first : first + BATCH]
        t0 = time.perf_counter()
        batch = preprocess.batch([open_rgb(p) for p in chunk])
        t1 = time.perf_counter()
        vectors = embed(batch)
        t2 = time.perf_counter()
        items.add([ItemRecord(uri=str(p)) for p in chunk], vectors)
        t3 = time.perf_counter()
        seconds["decode"] += t1 - t0
        seconds["model"] += t2 - t1
        seconds["index"] += t3 - t2
        parts.append(vectors)
    t4 = time.perf_counter()
    count = items.ntotal
    items.close()  # snapshots the index: the vectors are on disk and searchable
    seconds["index"] += time.perf_counter() - t4
    seconds["total"] = time.perf_counter() - start
    if count != len(paths):
        raise RuntimeError(f"{folder} indexed {count} images, expected {len(paths)}")
    return seconds, np.concatenate(parts)


def child_indexing(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import torch

    from retrieval.bundle.model_export import export_model
    from retrieval.bundle.runtime import load_runtime

    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        paths = write_jpegs(tmp / "images", args.images)
        jpeg_kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        eager, fast, pre = embedders(args.input_size)
        config = {"backbone": {"name": BACKBONE}, "embedder": {"embedding_dim": EMBEDDING_DIM}}
        config["embedder"]["pooling"] = POOLING
        (tmp / "bundle").mkdir()
        log("exporting TorchScript and ONNX ...")
        export_model(eager, tmp / "bundle", config, pre.input_size)
        embed = {
            "eager": torch_embed(eager),
            "channels_last": torch_embed(fast),
            "torchscript": load_runtime(tmp / "bundle", "torchscript", device="cpu").embed,
            "onnx": load_runtime(tmp / "bundle", "onnx", device="cpu").embed,
        }
        preprocess = pre
        sizes = {args.warmup_images, len(paths) % BATCH} - {0}  # + the last batch's size
        for name in PATHS:  # warm-up: untimed
            for j, subset in enumerate(paths[:size] for size in sorted(sizes)):
                index_images(subset, tmp / f"warmup{j}-{name}", preprocess, embed[name])
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in PATHS}
        vectors: dict[str, np.ndarray] = {}
        for repeat in range(args.repeats):
            for name in PATHS[repeat % 4 :] + PATHS[: repeat % 4]:  # rotate who goes first
                folder = tmp / f"run{repeat}-{name}"
                seconds, vectors[name] = index_images(paths, folder, preprocess, embed[name])
                runs[name].append(seconds)
                log(f"  repeat {repeat + 1}: {name} {len(paths) / seconds['total']:.1f} img/s")
        cosine = {n: float((vectors[n] * vectors["eager"]).sum(1).min()) for n in PATHS}
        return {
            "runs": runs,
            "min_cosine_vs_eager": cosine,
            "images": len(paths),
            "jpeg_kb": jpeg_kb,
            "input_size": pre.input_size,
            "resize": preprocess.resize,
            "torch_threads": torch.get_num_threads(),
            "versions": f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
            "peak_rss_mb": peak_rss_mb(),
        }
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def indexing_report(r: dict[str, Any]) -> list[str]:
    n = r["images"]

    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in r["runs"][name])

    base_total, base_model = med("eager", "total"), med("eager", "model")
    lines = [
        f"{n} JPEGs of 500 x 375 px (mean {r['jpeg_kb']:.0f} kB), {BACKBONE} + {POOLING} -> "
        f"{EMBEDDING_DIM}-d at {r['input_size']} px (short side resized to {r['resize']}), "
        f"batches of {BATCH}, torch threads {r['torch_threads']}, {r['versions']}, "
        f"peak RSS {r['peak_rss_mb']:.0f} MB.",
        "",
        "| path | decode+preprocess s | model s | index add s | total s | end-to-end img/s "
        "| model img/s | end-to-end vs eager | model vs eager | min cosine vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PATHS:
        total, model = med(name, "total"), med(name, "model")
        lines.append(
            f"| {name} | {med(name, 'decode'):.2f} | {model:.2f} | {med(name, 'index'):.2f} "
            f"| {total:.2f} | {n / total:.1f} | {n / model:.1f} | {base_total / total:.2f}x "
            f"| {base_model / model:.2f}x | {r['min_cosine_vs_eager'][name]:.6f} |"
        )
    return lines


# ---------------------------------------------------------------- (b) search


def nlist_for(n: int) -> int:
    """4 sqrt(n) rounded to the nearest power of two (in log scale)."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


def index_plans(n: int, d: int) -> list[tuple[str, str, str, Sequence[int]]]:
    """(family, factory, swept search parameter, values) for n vectors of dimension d."""
    nlist = nlist_for(n)
    return [
        ("Flat", "Flat", "", (0,)),
        ("HNSW32", "HNSW32", "efSearch", EF_SEARCH),
        (f"IVF-PQ{d // 8}", f"IVF{nlist},PQ{d // 8}np", "nprobe", NPROBE),
        (f"IVF-PQ{d // 4}", f"IVF{nlist},PQ{d // 4}np", "nprobe", NPROBE),
    ]


def make_vectors(n: int, d: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` base and ``nq`` query unit vectors from one mixture of CLUSTERS gaussians in a
    random LATENT_DIM-d subspace plus isotropic noise (AMBIENT_NOISE of the latent scale),
    so the intrinsic dimension is that of learned embeddings whatever ``d``. Built in blocks."""
    rng, latent = np.random.default_rng(seed), min(LATENT_DIM, d)
    centres = rng.standard_normal((CLUSTERS, latent)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((d, latent)))[0].T.astype(np.float32)
    noise = np.float32(AMBIENT_NOISE * math.sqrt(latent / d))

    def sample(count: int, stream: int) -> np.ndarray:
        out = np.empty((count, d), dtype=np.float32)
        gen = np.random.default_rng([seed, stream])
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            z = centres[gen.integers(CLUSTERS, size=m)] + gen.standard_normal((m, latent))
            x = z.astype(np.float32) @ basis + noise * gen.standard_normal((m, d), np.float32)
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return sample(n, 1), sample(nq, 2)


def measure(
    index: Any, queries: np.ndarray, warm: np.ndarray, exact: np.ndarray | None, args: Any
) -> dict[str, Any]:
    """Batch QPS (all threads), recall@K vs ``exact`` and one-thread single-query latency."""
    import faiss

    from retrieval.index import knn_recall

    faiss.omp_set_num_threads(args.threads)
    index.search(warm, K)
    batch: list[float] = []
    while len(batch) < args.repeats or (sum(batch) < args.batch_min_s and len(batch) < 100):
        t0 = time.perf_counter()
        _, ids = index.search(queries, K)
        batch.append(time.perf_counter() - t0)
    faiss.omp_set_num_threads(1)
    for row in warm:
        index.search(row[None], K)
    latency: list[float] = []
    start = time.perf_counter()
    for row in queries:
        t0 = time.perf_counter()
        index.search(row[None], K)
        latency.append(time.perf_counter() - t0)
        enough = len(latency) >= min(MIN_LATENCY_QUERIES, len(queries))
        if enough and time.perf_counter() - start > args.latency_budget_s:
            break
    return {
        "qps": len(queries) / statistics.median(batch),
        "recall": 1.0 if exact is None else knn_recall(ids, exact),
        "p50_ms": 1000 * float(np.percentile(latency, 50)),
        "p99_ms": 1000 * float(np.percentile(latency, 99)),
        "timed_queries": len(latency),
        "ids": ids,
    }


def measure_family(
    factory: str, params: list[str], base: np.ndarray, data: tuple, folder: Path, args: Any
) -> list[dict[str, Any]]:
    """Build ``factory`` on ``base`` (timed: train + add), then measure each search param;
    ``data`` is (queries, warm-up queries, exact ids or None). Rows keep the ids found."""
    from retrieval.index import EmbeddingIndex

    index = EmbeddingIndex(base.shape[1], factory, use_gpu=False, search_params=params[0])
    t0 = time.perf_counter()
    index.train(base)  # no-op for Flat and HNSW; <= 100,000 rows, as IndexedItems
    t1 = time.perf_counter()
    index.add(base)
    built = {"factory": factory, "train_s": t1 - t0, "add_s": time.perf_counter() - t1}
    built["bytes_per_vector"] = index.bytes_per_vector
    log(f"  {factory}: built in {built['train_s'] + built['add_s']:.1f} s")
    saved, rows = folder / "index.faiss", []
    if len(params) > 1:
        index.save(saved)  # search params are fixed at construction: reload for each
    for i, param in enumerate(params):
        if i:
            index = None  # free it before loading the next copy
            index = EmbeddingIndex.load(saved, factory=factory, use_gpu=False, search_params=param)
        rows.append({**built, "params": param, **measure(index, *data, args)})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if isinstance(v, float))
        log(f"    {param or 'exact'}: {shown}")
    return rows


def child_search(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    args.threads = faiss.omp_get_max_threads()
    n, d, skip = args.n, args.dim, json.loads(args.skip)
    t0 = time.perf_counter()
    base, queries = make_vectors(n, d, args.queries + WARMUP_QUERIES)
    warm, queries = queries[:WARMUP_QUERIES], queries[WARMUP_QUERIES:]
    log(f"n={n:,} d={d}: vectors made in {time.perf_counter() - t0:.1f} s")
    rows: list[dict[str, Any]] = []
    exact = None
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        for family, factory, key, values in index_plans(n, d):
            params = [f"{key}={v}" if key else "" for v in values]
            try:
                if family in skip:
                    raise SkipCase(f"skipped: {skip[family]}")
                data = (queries, warm, exact)
                found = measure_family(factory, params, base, data, Path(tmp), args)
            except (SkipCase, ValueError, RuntimeError, MemoryError) as err:  # the others go on
                note = str(err) if isinstance(err, SkipCase) else f"failed: {err!r}"[:300]
                found = [{"factory": factory, "note": note.splitlines()[0]}]
                log(f"  {factory}: {found[0]['note']}")
            if exact is None:  # Flat comes first: its results are the reference
                if "ids" not in found[0]:
                    raise RuntimeError(f"exact search failed: {found[0]['note']}")
                exact = found[0]["ids"]
            rows += [{"family": family, **row} for row in found]
    for row in rows:
        row.pop("ids", None)
    return {"n": n, "d": d, "rows": rows, "threads": args.threads, "peak_rss_mb": peak_rss_mb()}


def estimate_build_s(prev: dict[str, Any] | None, n: int) -> float | None:
    """Build time at ``n`` extrapolated from a smaller case of the same family and d:
    HNSW ~ n log n; IVF training ~ nlist and adding ~ n * nlist (an upper bound)."""
    if prev is None or prev["family"] == "Flat":  # Flat: adding is a copy
        return None
    grow = n / prev["n"]
    if prev["family"] == "HNSW32":
        return prev["add_s"] * grow * HNSW_GROWTH
    lists = nlist_for(n) / nlist_for(prev["n"])
    return prev["train_s"] * lists + prev["add_s"] * grow * lists


def search_report(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "| n | d | index | search params | build s | bytes/vector | p50 ms | p99 ms | queries "
        "timed | speed-up vs exact (p50) | QPS, batch of queries | recall@10 |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    goal = []
    for res in results:
        n, d, rows = res["n"], res["d"], res["rows"]
        exact_ms = rows[0]["p50_ms"]
        for r in rows:
            head = f"| {n:,} | {d} | {r['factory']} |"
            if "note" in r:
                lines.append(f"{head} {r['note']} | | | | | | | | |")
                continue
            r["speedup"] = exact_ms / r["p50_ms"]
            lines.append(
                f"{head} {r['params'] or '-'} | {r['train_s'] + r['add_s']:.1f} "
                f"| {r['bytes_per_vector']:.1f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} "
                f"| {r['timed_queries']} | {r['speedup']:.1f}x | {r['qps']:,.0f} "
                f"| {r['recall']:.4f} |"
            )
        if n == args.goal_n:
            goal.append(goal_line(n, d, rows, exact_ms))
    if not goal:
        goal = [f"- not evaluated: n = {args.goal_n:,} was not among the sizes run"]
    threads = results[0]["threads"] if results else "?"
    peaks = ", ".join(f"{r['n']:,}x{r['d']}: {r['peak_rss_mb']:.0f}" for r in results)
    return [
        *lines,
        "",
        f"QPS: {args.queries} queries per search call, {threads} threads; latency: one thread, "
        f"one query per call. Peak RSS MB per case: {peaks}.",
        "",
        f"Goal: an approximate setting with recall@10 >= {GOAL_RECALL} that is >= "
        f"{GOAL_SPEEDUP:.0f}x faster than exact at {args.goal_n:,} vectors (one thread, one "
        "query at a time):",
        *goal,
    ]


def goal_line(n: int, d: int, rows: list[dict[str, Any]], exact_ms: float) -> str:
    done = [r for r in rows if "note" not in r and r["factory"] != "Flat"]
    good = [r for r in done if r["recall"] >= GOAL_RECALL]
    if not good:
        best = max(done, key=lambda r: r["recall"], default=None)
        shown = f"{best['factory']} {best['params']} ({best['recall']:.4f})" if best else "none"
        return f"- d={d}: NOT MET: no setting reaches recall {GOAL_RECALL}; best recall {shown}"
    r = max(good, key=lambda r: r["speedup"])
    verdict = "MET" if r["speedup"] >= GOAL_SPEEDUP else "NOT MET"
    return (
        f"- d={d}: {verdict}; fastest with recall@10 >= {GOAL_RECALL}: {r['factory']} "
        f"{r['params']}, recall@10 {r['recall']:.4f}, "
        f"{r['speedup']:.1f}x faster (p50 {r['p50_ms']:.3f} ms vs exact {exact_ms:.3f} ms)"
    )


# ---------------------------------------------------------------- driver


def run_child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    options = ["--images", args.images, "--warmup-images", args.warmup_images]
    options += ["--repeats", args.repeats, "--queries", args.queries]
    options += ["--latency-budget-s", args.latency_budget_s]
    options += ["--input-size", args.input_size] if args.input_size else []
    options += ["--quick"] if args.quick else []
    command = [sys.executable, __file__, *map(str, options), *extra]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if out.returncode:  # reported, and the other cases go on
        log(f"FAILED (exit status {out.returncode}): {' '.join(extra)}")
        return {"failed": f"FAILED with exit status {out.returncode} (see stderr)"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_search(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (n, d) case, smallest n first; an index whose build time extrapolated from the
    previous size exceeds ``--budget-s`` is skipped."""
    results, notes = [], []
    previous: dict[tuple[int, str], dict[str, Any]] = {}
    for n in sorted(args.sizes):
        for d in args.dims:
            skip = {}
            for family, *_ in index_plans(n, d):
                est = estimate_build_s(previous.get((d, family)), n)
                if est is not None and est > args.budget_s:
                    skip[family] = f"estimated build {est:.1f} s > budget {args.budget_s:g} s"
                    notes.append(f"- {n:,} x {d} {family} skipped: {skip[family]}")
                    log(notes[-1])
            extra = ["--child", "search", "--n", str(n), "--dim", str(d)]
            res = run_child(args, *extra, "--skip", json.dumps(skip))
            if "failed" in res:
                notes.append(f"- {n:,} x {d}: {res['failed']}")
                continue
            for r in res["rows"]:
                if "note" not in r:
                    previous[(d, r["family"])] = {"n": n, **r}
            results.append(res)
    return results, notes


def describe(args: argparse.Namespace) -> list[str]:
    mode = "quick" if args.quick else "full"
    return [
        f"# bench_search ({mode}) on {platform.node()}, {os.cpu_count()} CPUs, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.2f} at start",
        f"- python {platform.python_version()}, faiss {package_version('faiss-cpu')}, "
        f"numpy {np.__version__}, Pillow {package_version('pillow')}",
        f"- method: every part and (n, d) case in its own subprocess; times are medians of "
        f"--repeats {args.repeats} runs after untimed warm-up runs ({args.warmup_images} images "
        f"per path in (a), {WARMUP_QUERIES} extra queries before each search measurement in (b))"
        f"; batch searches repeat until they took >= {args.batch_min_s:g} s in all.",
        "- (a): images rendered by retrieval.datasets.demo; per path open_rgb -> "
        "Preprocessing.batch -> model -> IndexedItems.add (Flat index, SQLite store, fsync per "
        "batch) and close (index snapshot); eager / channels_last run the Embedder under "
        "torch.inference_mode, TorchScript / ONNX the bundle's Runtime.embed; the four paths "
        "alternate (first one rotates per repeat).",
        f"- (b): unit vectors from {CLUSTERS} gaussian clusters in a random {LATENT_DIM}-d "
        f"subspace plus isotropic noise ({AMBIENT_NOISE} of the latent scale); {args.queries} "
        "queries from the same mixture, not in the base; exact top-10 from Flat (batch search) "
        "is the recall@10 reference. Latency = EmbeddingIndex.search of one query, one faiss "
        "thread (library overhead included), timed until all queries or "
        f"{args.latency_budget_s:.0f} s and >= {MIN_LATENCY_QUERIES} queries. IVF-PQ trained "
        "on <= 100,000 base rows (library default); nlist = 4 sqrt(n) rounded to a power of 2. "
        "Build = train + add, all threads. Search params are fixed at construction, so each "
        "swept value reloads the saved index (not timed).",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the logic")
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--record", type=Path, help="append the report to this file")
    parser.add_argument("--images", type=int, help="JPEGs in (a) (full 400)")
    parser.add_argument("--warmup-images", type=int, help="untimed images per path in (a)")
    parser.add_argument("--input-size", type=int, help="model input px (full: native 224)")
    parser.add_argument("--repeats", type=int, help="timed runs (medians)")
    parser.add_argument("--sizes", type=int, nargs="+", help="n in (b) (full 100k 200k 1M)")
    parser.add_argument("--dims", type=int, nargs="+", help="d in (b) (full 128 512)")
    parser.add_argument("--queries", type=int, help="queries in (b) (full 1000)")
    parser.add_argument("--budget-s", type=float, help="skip builds estimated longer (900)")
    parser.add_argument("--latency-budget-s", type=float, help="single-query timing per setting")
    parser.add_argument("--child", choices=("indexing", "search"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--skip", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.images < 1 or args.queries < 1:
        parser.error("--repeats, --images and --queries must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        run = child_indexing if args.child == "indexing" else child_search
        print(json.dumps(run(args)))
        return
    lines = describe(args)
    print("\n".join(lines), flush=True)
    if args.part in ("a", "all"):
        start = time.perf_counter()
        res = run_child(args, "--child", "indexing")
        part = [res["failed"]] if "failed" in res else indexing_report(res)
        part += ["", f"Part (a) took {time.perf_counter() - start:.0f} s."]
        lines += ["", "## (a) Indexing throughput: JPEG folder -> searchable vectors", "", *part]
        print("\n".join(lines[-len(part) - 3 :]), flush=True)
    if args.part in ("b", "all"):
        start = time.perf_counter()
        results, notes = run_search(args)
        part = search_report(results, args) + (["", *notes] if notes else [])
        part += ["", f"Part (b) took {time.perf_counter() - start:.0f} s."]
        lines += ["", "## (b) Search on synthetic vectors", "", *part]
        print("\n".join(lines[-len(part) - 3 :]), flush=True)
    if args.record:
        with args.record.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

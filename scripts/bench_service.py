"""Benchmark of ``retrieval serve``: end-to-end search latency and throughput over HTTP.

A bundle of ``--items`` items (default 100,000) is written once: the pretrained default
backbone (EfficientNet-Lite0, ImageNet weights from the installed package; GeM + a 512-d head
whose seeded random weights do not change the timing), ``--real`` real images whose vectors are
their embeddings and whose thumbnails exist, and synthetic unit vectors for the rest. The
server runs as ``retrieval serve`` in a child process on loopback; client threads upload a
distinct JPEG per request (so the upload cache never answers) for ``--requests`` requests per
concurrency level and time each one end to end: upload, decode, embed, search, JSON.

    python scripts/bench_service.py                  # 100k items, 1/4/16 clients (~5 min)
    python scripts/bench_service.py --quick          # 2,000 items, fewer requests (~1 min)
    python scripts/bench_service.py --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _machine import cpu_model  # noqa: E402  (scripts/ is on sys.path)

GOAL_P50_MS = 150.0
MODEL_CONFIG = {
    "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
    "embedder": {"embedding_dim": 512, "pooling": "gem", "head_bn": False},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def jpeg(seed: int, index: int, size: int) -> bytes:
    from retrieval.data.demo_render import render_demo_image

    buffer = io.BytesIO()
    render_demo_image(seed, index, index % 7, image_size=size).save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def build_bundle(folder: Path, items: int, real: int, size: int) -> None:
    import torch

    from retrieval.bundle.writer import GalleryItem, write_bundle
    from retrieval.models import Embedder, create_backbone
    from retrieval.search import Retriever

    torch.manual_seed(0)
    embedder = Embedder(create_backbone("tf_efficientnet_lite0", pretrained=True)).eval()
    images = folder.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(real):
        path = images / f"real_{i:05d}.jpg"
        path.write_bytes(jpeg(1, i, size))
        paths.append(path)
    gallery = [GalleryItem(uri=str(p), label=f"real_{i % 50:02d}") for i, p in enumerate(paths)]
    rng = np.random.default_rng(0)
    synthetic = rng.standard_normal((items - real, 512)).astype(np.float32)
    synthetic /= np.linalg.norm(synthetic, axis=1, keepdims=True)
    gallery += [
        GalleryItem(uri=f"synthetic/{i}.jpg", label="synthetic") for i in range(len(synthetic))
    ]
    log(f"writing a bundle of {items:,} items at {folder} (vectors of {real} real images first)")
    pre = embedder.preprocessing
    scratch = folder.parent / "scratch"
    write_bundle(scratch, embedder, MODEL_CONFIG, pre, gallery[:1], synthetic[:1], overwrite=True)
    with Retriever.load(scratch) as retriever:
        real_vectors = retriever.embed(paths)
    vectors = np.concatenate([real_vectors, synthetic])
    write_bundle(folder, embedder, MODEL_CONFIG, pre, gallery, vectors, overwrite=True)


def drive(base: str, queries: list[bytes], clients: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    order = iter(range(len(queries)))

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    reply = http.post("/search", files={"image": ("q.jpg", queries[i])})
                    ok = reply.status_code == 200 and len(reply.json()["results"]) == 10
                    problem = None if ok else f"{reply.status_code} {reply.text[:100]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took * 1000)
                    if problem:
                        errors.append(problem)

    before = httpx.get(f"{base}/stats").json()["batching"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    after = httpx.get(f"{base}/stats").json()["batching"]
    batches = after["batches"] - before["batches"]
    p50, p99 = np.percentile(latencies, [50, 99])
    return {
        "clients": clients,
        "requests": len(latencies),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "rps": len(latencies) / wall,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "mean_batch": (after["queries"] - before["queries"]) / batches if batches else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--real", type=int, default=500, help="real images among the items")
    parser.add_argument("--requests", type=int, nargs=3, default=[100, 200, 320])
    parser.add_argument("--clients", type=int, nargs=3, default=[1, 4, 16])
    parser.add_argument("--query-size", type=int, default=480, help="side of query JPEGs (px)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_service"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", type=Path, default=None)
    parser.add_argument(
        "--serve-args", default="", help="extra `retrieval serve` options, e.g. '--batch-size 1'"
    )
    args = parser.parse_args()
    if args.quick:
        args.items, args.real, args.requests = 2_000, 100, [20, 40, 64]
    bundle = args.work / f"bundle_{args.items}"
    if args.rebuild or not (bundle / "manifest.json").is_file():
        build_bundle(bundle, args.items, args.real, args.query_size)
    warmup = 10
    queries = [jpeg(2, i, args.query_size) for i in range(warmup + sum(args.requests))]
    kb = statistics.mean(map(len, queries)) / 1024
    log(f"{len(queries)} distinct query JPEGs, mean {kb:.0f} KB")

    from tests.service.live import serve

    rows = []
    with serve(bundle, *args.serve_args.split()) as base:
        drive(base, queries[:warmup], 1)
        used = warmup
        for clients, count in zip(args.clients, args.requests, strict=True):
            log(f"{clients} client(s), {count} requests ...")
            rows.append(drive(base, queries[used : used + count], clients))
            used += count
            log(f"  p50 {rows[-1]['p50_ms']:.1f} ms, {rows[-1]['rps']:.1f} req/s")
    report = describe(args) + table(rows)
    print("\n".join(report))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n")


def describe(args: argparse.Namespace) -> list[str]:
    return [
        f"# bench_service on {platform.node()}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at the end; server and clients share them",
        f"- bundle: {args.items:,} items ({args.real} real images, the rest synthetic unit "
        "vectors), 512-d, Flat index, EfficientNet-Lite0 224 px, ONNX Runtime",
        f"- server: retrieval serve {args.serve_args or '(default batching: 16, 2 ms)'}",
        f"- queries: distinct {args.query_size} px JPEGs, one per request, k=10; 10 warm-up "
        "requests first; latency = client-side, upload to parsed JSON",
        "",
    ]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| clients | requests | p50 ms | p99 ms | req/s | mean batch | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['rps']:.1f} | {r['mean_batch']:.2f} | {r['errors']} |"
        )
    single = rows[0]["p50_ms"]
    verdict = "met" if single < GOAL_P50_MS else "NOT met"
    lines += ["", f"Goal p50 < {GOAL_P50_MS:.0f} ms with one client: {verdict} ({single:.1f} ms)."]
    errors = [r["first_error"] for r in rows if r["errors"]]
    if errors:
        lines.append(f"First error: {errors[0]}")
    return lines


if __name__ == "__main__":
    main()

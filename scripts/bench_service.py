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
    python scripts/bench_service.py --quick --hostile  # 16 clients of near-limit PNGs + 4 normal

``--hostile``: for ``--seconds`` (30), at once: 16 clients upload 6,300 x 6,300 RGBA PNGs
(just under the 40 M pixel limit, ~170 KB each, each one distinct) as fast as the server
answers them; 32 clients send query bodies at 16 bytes/s (``--slow-clients``,
``--slow-rate``), reconnecting once answered; 2 clients upload a 40 x 1,000,000 and a
1 x 4,000,000 PNG (``--aspect-clients``); 4 clients send the normal query JPEGs. Reports the
normal clients' latency, the server's peak memory (VmHWM), and the status counts of each kind
with the 5xx other than the deliberate 503. A kind set to 0 clients is left out.
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

from tests.service.live import memory_of  # noqa: E402  (the live tests' /proc reader)

GOAL_P50_MS = 150.0
MODEL_CONFIG = {
    "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
    "embedder": {"embedding_dim": 512, "pooling": "gem", "head_bn": False},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def jpeg(seed: int, index: int, size: int) -> bytes:
    from retrieval.datasets.demo import render_demo_image

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


def hostile_png(side: int) -> bytes:
    """An RGBA PNG of side x side pixels that compresses to almost nothing."""
    from PIL import Image

    image = Image.new("RGBA", (side, side), (30, 120, 200, 128))
    image.paste((200, 40, 40, 255), (0, 0, side // 4, side // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def aspect_pngs() -> list[bytes]:
    """Two RGB PNGs of extreme aspect, made in memory: 40 x 1,000,000 (40 M pixels, the
    default limit) and 1 x 4,000,000 pixels; each compresses to a few hundred KB."""
    from PIL import Image

    found = []
    for size in ((40, 1_000_000), (1, 4_000_000)):
        image = Image.new("RGB", size, (30, 120, 200))
        image.paste((200, 40, 40), (0, 0, size[0], size[1] // 4))
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=9)
        found.append(buffer.getvalue())
    return found


class Tally:
    """What the clients of a hostile run saw: status counts by kind of client, the normal
    clients' latencies (ms)."""

    def __init__(self, kinds: list[str]) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
        self.latencies: list[float] = []
        self.order = iter(range(10**9))

    def count(self, kind: str, status: str, ms: float | None = None) -> None:
        with self.lock:
            self.counts[kind][status] = self.counts[kind].get(status, 0) + 1
            if ms is not None:
                self.latencies.append(ms)

    def next(self) -> int:
        with self.lock:
            return next(self.order)


def upload_client(
    base: str, kind: str, images: list[bytes], stop: float, tally: Tally, timed: bool
) -> None:
    """Upload ``images`` in turn (each made distinct by bytes after its end) until ``stop``;
    a 503 is retried after 50 ms unless ``timed`` (a normal client, whose latency counts)."""
    import httpx

    with httpx.Client(base_url=base, timeout=120) as http:
        while time.monotonic() < stop:
            i = tally.next()
            data = images[i % len(images)] + b"%d" % i
            start = time.perf_counter()
            try:
                status = str(
                    http.post("/search", files={"image": (f"{kind}{i}", data)}).status_code
                )
            except httpx.HTTPError as err:
                status = type(err).__name__
            tally.count(kind, status, (time.perf_counter() - start) * 1000 if timed else None)
            if not timed and status == "503":
                time.sleep(0.05)  # a flood, not a spin: retry at once, almost


def slow_client(base: str, body: bytes, rate: int, stop: float, tally: Tally) -> None:
    """Send ``POST /search`` bodies of ``len(body)`` bytes at ``rate`` bytes/s until ``stop``;
    counts the status the server answers each with ("cut": none before ``stop``)."""
    import select
    import socket

    host, port = base.removeprefix("http://").split(":")
    head = (
        b"POST /search HTTP/1.1\r\nHost: bench\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: %d\r\n\r\n"
    )
    while time.monotonic() < stop:
        status, sent = "cut", 0
        try:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(head % len(body))
                while time.monotonic() < stop:
                    if sent < len(body):
                        sock.sendall(body[sent : sent + rate])
                        sent += rate
                    if select.select([sock], [], [], 1.0)[0]:
                        reply = sock.recv(64)
                        status = reply[9:12].decode() if reply.startswith(b"HTTP/") else "closed"
                        break
        except OSError as err:
            status = type(err).__name__
        tally.count("slow", status)


def slow_body(query: bytes) -> bytes:
    """A well-formed multipart body of one query image, as a slow client would send it."""
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n'
    return part + query + b"\r\n--xyz--\r\n"


def sample_memory(pid: int, stop: float, peak: list[int]) -> None:
    while time.monotonic() < stop + 1:
        peak[0] = max(peak[0], memory_of(pid)["VmRSS"])
        time.sleep(0.05)


def drive_hostile(
    base: str, pid: int, queries: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """For ``args.seconds``, at once: clients flooding near-limit PNGs, clients trickling
    bodies at ``args.slow_rate`` bytes/s, clients of extreme-aspect PNGs, and normal clients
    of query JPEGs; each kind's status counts, the normal clients' latencies, peak memory."""
    flood, aspect = [hostile_png(args.hostile_side)], aspect_pngs()
    stop = time.monotonic() + args.seconds
    tally = Tally(["hostile", "slow", "aspect", "normal"])
    peak = [0]
    jobs: list[tuple[Any, tuple[Any, ...]]] = [(sample_memory, (pid, stop, peak))]
    jobs += [(upload_client, (base, "hostile", flood, stop, tally, False))] * args.hostile_clients
    jobs += [(slow_client, (base, slow_body(queries[0]), args.slow_rate, stop, tally))] * (
        args.slow_clients
    )
    jobs += [(upload_client, (base, "aspect", aspect, stop, tally, False))] * args.aspect_clients
    jobs += [(upload_client, (base, "normal", queries, stop, tally, True))] * args.normal_clients
    before = memory_of(pid)
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(fn, *fn_args) for fn, fn_args in jobs]:
            future.result()
    after = memory_of(pid)
    latencies = tally.latencies
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    return {
        "seconds": args.seconds,
        "counts": tally.counts,
        "normal_requests": len(latencies),
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "rss_before": before["VmRSS"],
        "hwm_before": before["VmHWM"],
        "hwm_after": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "rss_sampled_peak": peak[0],
        "png_kb": len(flood[0]) / 1024,
        "aspect_kb": [round(len(png) / 1024) for png in aspect],
        "stats": _get_json(f"{base}/stats"),
    }


def _get_json(url: str) -> Any:
    import httpx

    return httpx.get(url, timeout=30).json()


def server_errors(counts: dict[str, int]) -> int:
    """Answers of 5xx other than the deliberate 503 (a client error string is not one)."""
    return sum(n for s, n in counts.items() if s.startswith("5") and s != "503")


def hostile_report(args: argparse.Namespace, r: dict[str, Any]) -> list[str]:
    gb = 1024**3
    decodes, limits = r["stats"].get("decodes", {}), r["stats"].get("limits", {})
    normal_5xx = sum(n for s, n in r["counts"]["normal"].items() if s.startswith("5"))
    hostile_5xx = sum(server_errors(r["counts"][kind]) for kind in ("hostile", "slow", "aspect"))
    lines = describe(args) + [
        f"- hostile: {args.hostile_clients} clients of {args.hostile_side} x {args.hostile_side} "
        f"RGBA PNGs ({r['png_kb']:.0f} KB, distinct bytes), a 503 retried after 50 ms; "
        f"slow: {args.slow_clients} clients sending a query's body at {args.slow_rate} bytes/s "
        f"(reconnecting once answered); aspect: {args.aspect_clients} clients of 40 x "
        f"1,000,000 and 1 x 4,000,000 RGB PNGs ({r['aspect_kb']} KB); normal: "
        f"{args.normal_clients} clients of the query JPEGs; {r['seconds']:.0f} s",
        f"- decode budget: large {decodes.get('large')}, small {decodes.get('small')}, "
        f"max_requests {limits.get('max_requests')}, max_receiving {limits.get('max_receiving')}"
        f", body: {limits.get('body_min_rate')} bytes/s after {limits.get('body_grace_s')} s",
        "",
        "| kind | 200 | 408 | 503 | 504 | 5xx but 503 | other |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, c in r["counts"].items():
        other = {s: n for s, n in c.items() if s not in ("200", "408", "503", "504")}
        lines.append(
            f"| {kind} | {c.get('200', 0)} | {c.get('408', 0)} | {c.get('503', 0)} | "
            f"{c.get('504', 0)} | {server_errors(c)} | {other or '-'} |"
        )
    lines += [
        "",
        f"Normal clients: {r['normal_requests']} requests, p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms.",
        f"Server memory: RSS {r['rss_before'] / gb:.2f} GB before, peak (VmHWM) "
        f"{r['hwm_after'] / gb:.2f} GB (was {r['hwm_before'] / gb:.2f} GB at start; sampled "
        f"RSS peak {r['rss_sampled_peak'] / gb:.2f} GB), RSS {r['rss_after'] / gb:.2f} GB after.",
        "",
        f"Goals: peak RSS <= 2.5 GB: {'met' if r['hwm_after'] <= 2.5 * gb else 'NOT met'}; "
        f"normal p99 <= 2 s: {'met' if r['p99_ms'] <= 2000 else 'NOT met'}; "
        f"no 5xx for normal clients: {'met' if normal_5xx == 0 else 'NOT met'} ({normal_5xx}); "
        f"no 5xx but deliberate 503 for hostile ones: {'met' if not hostile_5xx else 'NOT met'}"
        f" ({hostile_5xx}).",
    ]
    return lines


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--hostile", action="store_true", help="hostile clients (see top)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--hostile-clients", type=int, default=16)
    parser.add_argument("--normal-clients", type=int, default=4)
    parser.add_argument("--hostile-side", type=int, default=6300)
    parser.add_argument("--slow-clients", type=int, default=32, help="clients trickling bodies")
    parser.add_argument("--slow-rate", type=int, default=16, help="their bytes per second")
    parser.add_argument(
        "--aspect-clients", type=int, default=2, help="clients of 40x1M and 1x4M PNGs"
    )
    args = parser.parse_args()
    if args.quick:
        args.items, args.real, args.requests = 2_000, 100, [20, 40, 64]
    return args


def main() -> None:
    args = parse_args()
    bundle = args.work / f"bundle_{args.items}"
    if args.rebuild or not (bundle / "manifest.json").is_file():
        build_bundle(bundle, args.items, args.real, args.query_size)
    warmup = 10
    queries = [jpeg(2, i, args.query_size) for i in range(warmup + sum(args.requests))]
    kb = statistics.mean(map(len, queries)) / 1024
    log(f"{len(queries)} distinct query JPEGs, mean {kb:.0f} KB")

    from tests.service.live import serve

    if args.hostile:
        with serve(bundle, *args.serve_args.split()) as base:
            drive(base, queries[:warmup], 1)
            log(
                f"hostile: {args.hostile_clients} flooding, {args.slow_clients} slow, "
                f"{args.aspect_clients} aspect, {args.normal_clients} normal clients, "
                f"{args.seconds} s"
            )
            result = drive_hostile(base, base.pid, queries[warmup:], args)
        report = hostile_report(args, result)
        print("\n".join(report))
        if args.record:
            with open(args.record, "a", encoding="utf-8") as handle:
                handle.write("\n".join(report) + "\n")
        return

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

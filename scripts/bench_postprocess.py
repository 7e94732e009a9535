"""Benchmark of the search-time stage in the service: query latency with and without it.

Two bundles of the same model and gallery, one exported without search-time steps and one
with them (e.g. ``postprocess=[whiten,dba,aqe]``), are served at once by two ``retrieval
serve`` child processes on loopback. One client sends a block of query images to one server,
then the same block to the other (and, with ``--rerank``, to the stepped one with
``rerank=true``), block after block with the order rotating, so the machine's noise falls on
all of them alike. Every upload is distinct (trailing zero bytes that decoders ignore), so the
upload cache never answers.
Reports the median (p50) and p90 latency of each and the ratio to plain.

    python scripts/bench_postprocess.py PLAIN_BUNDLE STEPPED_BUNDLE data/copydetect/queries
    python scripts/bench_postprocess.py ... --requests 200 --rerank --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from _machine import cpu_model  # noqa: E402

GOAL_RATIO = 1.25  # p50 with the steps at most 25% above plain


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def query_files(source: Path, count: int) -> list[Path]:
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(files) < count:
        raise SystemExit(f"{source} holds {len(files)} images; --requests {count} needs as many")
    return files[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plain", type=Path, help="bundle exported without postprocess steps")
    parser.add_argument("stepped", type=Path, help="the same bundle exported with them")
    parser.add_argument("queries", type=Path, help="folder of query images (one per request)")
    parser.add_argument("--requests", type=int, default=200, help="requests per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=20, help="requests in a row per variant")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--rerank", action="store_true", help="also time rerank=true")
    parser.add_argument("--serve-args", default="", help="extra `retrieval serve` options")
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()

    import httpx

    from tests.service.live import serve

    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("none", "plain", {}),
        ("steps", "stepped", {}),
    ]
    if args.rerank:
        variants.append(("steps + rerank", "stepped", {"rerank": "true"}))
    latencies: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    files = query_files(args.queries, args.warmup + args.requests)
    with ExitStack() as stack:
        bases = {
            "plain": stack.enter_context(serve(args.plain, *args.serve_args.split())),
            "stepped": stack.enter_context(serve(args.stepped, *args.serve_args.split())),
        }
        clients = {
            k: stack.enter_context(httpx.Client(base_url=v, timeout=60)) for k, v in bases.items()
        }
        steps = {k: clients[k].get("/stats").json().get("postprocess") for k in clients}
        log(f"steps: plain {steps['plain']}, stepped {steps['stepped']}")
        for first in range(0, len(files), args.block):
            block = [path.read_bytes() for path in files[first : first + args.block]]
            # blocks, not single requests, take turns: a server that has just run keeps its
            # caches and threads warm, so each variant runs a whole block in a row; the
            # order of the variants rotates from block to block
            shift = (first // args.block) % len(variants)
            for turn, (name, server, params) in enumerate(variants[shift:] + variants[:shift]):
                time.sleep(0.2)  # the previous server's threads go idle
                for offset, image in enumerate(block):
                    # the same images for every variant, made distinct uploads by trailing
                    # bytes that decoders ignore (the upload cache would answer a repeat)
                    data = image + b"\0" * (turn + 1)
                    start = time.perf_counter()
                    reply = clients[server].post(
                        "/search", params={"k": args.k, **params}, files={"image": ("q", data)}
                    )
                    took = (time.perf_counter() - start) * 1000.0
                    if reply.status_code != 200:
                        raise SystemExit(f"{name}: {reply.status_code} {reply.text[:200]}")
                    if first + offset >= args.warmup:
                        latencies[name].append(took)
            log(f"{min(first + args.block, len(files))} of {len(files)} images ...")
    plain = float(np.median(latencies["none"]))
    rows = []
    for name, _, _ in variants:
        p50, p90 = np.percentile(latencies[name], [50, 90])
        rows.append((name, float(p50), float(p90), float(p50) / plain))
    report = describe(args, steps["stepped"]) + table(rows)
    print("\n".join(report))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n")


def describe(args: argparse.Namespace, steps: Any) -> list[str]:
    return [
        f"## Search-time steps in the service ({datetime.date.today().isoformat()})",
        "",
        f"- machine: {cpu_model()}, {platform.machine()}, python {platform.python_version()}",
        f"- plain bundle: `{args.plain}`; stepped bundle: `{args.stepped}` with steps "
        f"`{json.dumps(steps)}`",
        f"- {args.requests} images of `{args.queries}` sent to every variant, in blocks of "
        f"{args.block} taking turns (a distinct upload each: trailing zero bytes), one client; "
        f"k = {args.k}; {args.warmup} warm-up images not counted",
        f"- `python scripts/bench_postprocess.py {args.plain} {args.stepped} {args.queries}"
        f" --requests {args.requests}{' --rerank' if args.rerank else ''}`",
        "",
    ]


def table(rows: list[tuple[str, float, float, float]]) -> list[str]:
    lines = [
        "| variant | p50 ms | p90 ms | p50 / none | goal (<= 1.25) |",
        "|---|---|---|---|---|",
    ]
    for name, p50, p90, ratio in rows:
        verdict = "" if name == "none" else ("met" if ratio <= GOAL_RATIO else "missed")
        lines.append(f"| {name} | {p50:.1f} | {p90:.1f} | {ratio:.3f} | {verdict} |")
    return lines + [""]


if __name__ == "__main__":
    main()

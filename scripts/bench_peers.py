"""Benchmark against the peers (issue 15): ours next to open-metric-learning (OML) and
pytorch-metric-learning (PML) on the same data in one run, and our CPU roofline.

Sections (``--only``; default: all, in this order):

- ``eval``: the metric computation of an evaluation on the same embeddings, leave-one-out
  and query/gallery: ours (``retrieval.evaluation.evaluate_embeddings``), OML 4
  (``oml.functional.knn.batched_knn[_qg]`` + ``oml.functional.metrics.calc_retrieval_metrics``,
  the two calls ``EmbeddingMetrics.compute_metrics`` makes) and PML
  (``AccuracyCalculator(k="max_bin_count").get_accuracy``). Data: seeded synthetic clustered
  unit vectors, 512-d, labels of 2-9 items (mean 5.35, SOP-like), no exact duplicates. Every
  measurement runs in a fresh subprocess (imports and data loading excluded from the time; peak
  RSS = the child's VmHWM, imports and data included), the implementations alternate within
  each repeat, and a child past ``--max-rss-gb`` or ``--max-seconds`` is stopped and the peer
  skipped at larger sizes. Values are compared key by key where the definitions agree.
- ``roofline``: FLOPs per image of the default backbone (``FlopCounterMode``: a multiply-add
  is 2 FLOPs; convolutions, matmuls only), float32 GEMM FLOP/s (torch.mm), memory bandwidth
  (1 GiB sum / copy), and what the Embedder, its ONNX export and a Flat ``EmbeddingIndex``
  reach against them.
- ``training``: ``scripts/peers_training.py`` (train.py's path, a plain loop, PML's
  ``MetricLossOnly``, OML's ``ExtractorModule``; equal loss on one batch checked first).
- ``indexing``: ``scripts/peers_indexing.py`` (``retrieval index``'s path beside OML's
  predict path and a naive loop, on one folder of photos; decoders alone).

Needs the ``peers`` extra, in its own environment (OML pins numpy<2)::

    python -m venv /tmp/peers_venv && /tmp/peers_venv/bin/pip install -e ".[peers]"
    /tmp/peers_venv/bin/python scripts/bench_peers.py --record experiments/FILE.md
    /tmp/peers_venv/bin/python scripts/bench_peers.py --quick          # seconds: checks the logic
    /tmp/peers_venv/bin/python scripts/bench_peers.py --only roofline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _machine import cpu_model  # noqa: E402  (scripts/ is on sys.path)
from bench_eval import make_data  # noqa: E402  (the same generator as bench_eval)

SECTIONS = ("eval", "roofline", "training", "indexing")
DIM, PER_LABEL = 512, 5.35
OML_KS = (1, 10)

# ---------------------------------------------------------------------------------- eval


def vm_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def max_r(labels: np.ndarray, query_labels: np.ndarray | None) -> int:
    """The largest R (relevant gallery items of a query): PML's k for ``max_bin_count``."""
    counts = np.bincount(labels)
    if query_labels is None:
        return int(counts.max()) - 1
    return int(counts[np.unique(query_labels)].max())


def oml_definitions(
    ids: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray
) -> dict[str, float]:
    """OML's precision@k (hits in k / min(k, R)) and map@k (sum of P(i) at hits / hits in k,
    0 without a hit), from our ranked ids: checks that the rankings agree where our own
    metrics are defined otherwise."""
    rel = gallery_labels[ids] == query_labels[:, None]
    hits = np.cumsum(rel, axis=1)
    out = {}
    for k in OML_KS:
        h = hits[:, k - 1]
        ap = (hits[:, :k] / np.arange(1, k + 1) * rel[:, :k]).sum(axis=1)
        out[f"oml_precision@{k}"] = float((h / np.minimum(k, r)).mean())
        out[f"oml_map@{k}"] = float(np.where(h > 0, ap / np.maximum(h, 1), 0.0).mean())
    return out


def eval_child(impl: str, data: Path, protocol: str) -> dict[str, Any]:
    """One timed metric computation in this (fresh) process."""
    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    q, qy = (arrays["q"], arrays["qy"]) if protocol == "qg" else (None, None)
    kmax = max_r(y, qy)
    ks = (*OML_KS, kmax)
    if impl.startswith("ours"):
        from retrieval.evaluation import evaluate_embeddings

        names = ["recall", "precision", "map@k", "map@r", "r_precision"]
        if impl == "ours+map":
            names.append("map")

        def run() -> dict[str, float]:
            args = (x, y) if q is None else (q, qy, x, y)
            result = evaluate_embeddings(*args, ks=ks, metrics=names, keep_neighbors=max(OML_KS))
            nonlocal kept
            kept = result
            return dict(result.metrics)

        kept: Any = None
    elif impl == "oml":
        import torch
        from oml.functional.knn import batched_knn, batched_knn_qg
        from oml.functional.metrics import calc_retrieval_metrics

        def run() -> dict[str, float]:
            if q is None:
                ids = torch.arange(len(x))
                _, retrieved, gt = batched_knn(
                    torch.from_numpy(x),
                    ids,
                    ids,
                    top_n=max(OML_KS),
                    labels_gt=torch.from_numpy(y),
                )
            else:
                _, retrieved, gt = batched_knn_qg(
                    torch.from_numpy(q),
                    torch.from_numpy(x),
                    top_n=max(OML_KS),
                    labels_query=torch.from_numpy(qy),
                    labels_gallery=torch.from_numpy(y),
                )
            m = calc_retrieval_metrics(
                retrieved,
                gt,
                cmc_top_k=OML_KS,
                precision_top_k=OML_KS,
                map_top_k=OML_KS,
                verbose=False,
            )
            out = {f"recall@{k}": float(v) for k, v in m["cmc"].items()}
            out.update({f"oml_precision@{k}": float(v) for k, v in m["precision"].items()})
            out.update({f"oml_map@{k}": float(v) for k, v in m["map"].items()})
            return out
    else:
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        def run() -> dict[str, float]:
            calc = AccuracyCalculator(
                include=(
                    "precision_at_1",
                    "r_precision",
                    "mean_average_precision_at_r",
                    "mean_average_precision",
                ),
                k="max_bin_count",
                device=torch.device("cpu"),
            )
            if q is None:
                v = calc.get_accuracy(x, y, ref_includes_query=True)
            else:
                v = calc.get_accuracy(q, qy, x, y, ref_includes_query=False)
            return {
                "recall@1": float(v["precision_at_1"]),
                "r_precision": float(v["r_precision"]),
                "map@r": float(v["mean_average_precision_at_r"]),
                f"map@{kmax}": float(v["mean_average_precision"]),
            }

    rss_before = vm_mb("VmRSS")
    start = time.perf_counter()
    values = run()
    seconds = time.perf_counter() - start
    peak = vm_mb("VmHWM")
    if impl.startswith("ours"):  # untimed: our ranking under OML's definitions
        r = np.bincount(y)[qy if qy is not None else y] - (0 if qy is not None else 1)
        rows = kept.query_rows
        labels_q = (qy if qy is not None else y)[rows]
        values.update(oml_definitions(kept.neighbor_ids, y, labels_q, r[rows]))
    return {"seconds": seconds, "peak_mb": peak, "before_mb": rss_before, "values": values}


def run_watched(cmd: list[str], max_rss_gb: float, max_seconds: float) -> dict[str, Any]:
    """Run ``cmd`` (printing one JSON line), stopping it past the RSS or time limit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        start, peak, why = time.monotonic(), 0.0, ""
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss = next(int(s.split()[1]) for s in status.splitlines() if s.startswith("VmRSS"))
                peak = max(peak, rss / 2**20)
            except (OSError, StopIteration):
                pass
            if peak > max_rss_gb:
                why = f"stopped at {peak:.1f} GB RSS (limit {max_rss_gb:g} GB)"
            elif time.monotonic() - start > max_seconds:
                why = f"stopped after {max_seconds:.0f} s"
            if why:
                proc.kill()
                proc.wait()
                return {"error": why}
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            last = (err.read().strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {proc.returncode}: {last[:240]}"}
        return json.loads(out.read().strip().splitlines()[-1])


def eval_section(args: argparse.Namespace, workdir: Path) -> list[str]:
    impls = ("ours", "ours+map", "oml", "pml")
    lines = [
        "## Evaluation: the same embeddings, 512-d, labels of 2-9 items",
        "",
        "Time: median of the repeats (each a fresh process; imports and data loading "
        "excluded). Peak RSS: the child's VmHWM (imports and data included). `ours` computes "
        "recall, precision, map@k at k = 1, 10, max R, MAP@R and R-precision; `ours+map` adds "
        "full mAP over the exact ranking (no peer has it).",
        "",
        "| protocol | n gallery | n queries | impl | runs | time s (median) | peak RSS MB "
        "| RSS before MB | recall@1 | recall@10 | MAP@R | R-prec | map@maxR (PML def) "
        "| OML map@10 | OML precision@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary, checks = [], []
    failed: set[tuple[str, str]] = set()
    for protocol in args.protocols:
        for n in args.sizes:
            repeats = args.repeats if n <= args.repeat_below else 1
            nq = n // 4 if protocol == "qg" else n
            x, y, q, qy = make_data(n, DIM, PER_LABEL, nq if protocol == "qg" else 0)
            if protocol == "loo" and np.bincount(y)[y[-1]] == 1:  # cut at n: a lone label
                y[-1] = y[-2]  # (query/gallery: query labels are drawn from y, never lone)
            path = workdir / f"{protocol}_{n}.npz"
            np.savez(path, x=x, y=y, q=q, qy=qy)
            kmax = max_r(y, qy if protocol == "qg" else None)
            del x, y, q, qy
            active = [
                i
                for i in impls
                if (protocol, i) not in failed and (n <= args.peer_max_n or i.startswith("ours"))
            ]
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in active}
            for rep in range(repeats):
                order = active[rep % len(active) :] + active[: rep % len(active)]
                for impl in order:
                    if runs[impl] and "error" in runs[impl][-1]:
                        continue
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        impl,
                        "--data",
                        str(path),
                        "--protocol",
                        protocol,
                    ]
                    res = run_watched(cmd, args.max_rss_gb, args.max_seconds)
                    runs[impl].append(res)
                    print(
                        f"  {protocol} n={n} {impl} rep {rep}: "
                        f"{res.get('error') or round(res['seconds'], 2)}",
                        flush=True,
                    )
            path.unlink()
            medians: dict[str, tuple[float, float]] = {}
            for impl in active:
                ok = [r for r in runs[impl] if "error" not in r]
                row = f"| {protocol} | {n:,} | {nq:,} | {impl} |"
                if not ok:
                    failed.add((protocol, impl))
                    lines.append(f"{row} 0 | {runs[impl][-1]['error']} | | | | | | | | | |")
                    continue
                v = ok[0]["values"]
                t = statistics.median(r["seconds"] for r in ok)
                m = max(r["peak_mb"] for r in ok)
                medians[impl] = (t, m)

                def f(key: str, values: dict[str, float] = v) -> str:
                    return f"{values[key]:.6f}" if key in values else "-"

                lines.append(
                    f"{row} {len(ok)} | {t:.2f} | {m:.0f} | {ok[0]['before_mb']:.0f} "
                    f"| {f('recall@1')} | {f('recall@10')} | {f('map@r')} | {f('r_precision')} "
                    f"| {f(f'map@{kmax}')} | {f('oml_map@10')} | {f('oml_precision@10')} |"
                )
                if impl in ("oml", "pml") and runs.get("ours") and "values" in runs["ours"][0]:
                    ours = runs["ours"][0]["values"]
                    diffs = {k: abs(ours[k] - val) for k, val in v.items() if k in ours}
                    diffs = {k: d if d == d else float("inf") for k, d in diffs.items()}  # NaN
                    worst = max(diffs, key=lambda k: diffs[k])
                    checks.append(
                        f"- {protocol} {n:,}: ours vs {impl.upper()} on {sorted(diffs)}: "
                        f"largest difference {diffs[worst]:.2e} ({worst})"
                    )
            peers = {i: medians[i] for i in ("oml", "pml") if i in medians}
            if "ours" in medians and peers:
                fast = min(peers, key=lambda i: peers[i][0])
                (t, m), (tp, mp) = medians["ours"], peers[fast]
                small = min(peers, key=lambda i: peers[i][1])
                full = medians.get("ours+map")
                summary.append(
                    f"- {protocol} {n:,}: faster peer {fast.upper()}; time ours/{fast.upper()} "
                    f"= {t / tp:.3f}, peak RSS ours/{fast.upper()} = {m / mp:.3f} "
                    f"(ours/{small.upper()} = {m / peers[small][1]:.3f})"
                    + (
                        f"; with full mAP: time {full[0] / tp:.3f}, RSS {full[1] / mp:.3f}"
                        if full
                        else ""
                    )
                )
    return [
        *lines,
        "",
        "Ratios (goal: time <= 0.5x the faster peer, RSS <= 1x):",
        "",
        *summary,
        "",
        "Equal values where the definitions agree:",
        "",
        *checks,
        "",
    ]


# ------------------------------------------------------------------------------ roofline


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_flops(n: int, threads: int, repeats: int) -> float:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = median_time(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    torch.set_num_threads(before)
    return 2 * n**3 / t


def bandwidth(repeats: int) -> dict[str, float]:
    """Bytes/s of a 1 GiB float32 read (numpy sum: one thread; torch sum: torch's threads) and
    copy (numpy, counted as 2 GiB moved: read + write)."""
    import torch

    a = np.ones(2**28, dtype=np.float32)
    b = np.empty_like(a)
    ta = torch.from_numpy(a)
    gib = float(a.nbytes)
    return {
        "numpy sum (1 thread)": gib / median_time(a.sum, repeats),
        f"torch sum ({torch.get_num_threads()} threads)": gib / median_time(ta.sum, repeats),
        "numpy copy (1 thread, read + write)": 2
        * gib
        / median_time(lambda: np.copyto(b, a), repeats),
    }


def conv_classes(model: Any, x: Any) -> dict[str, list[float]]:
    """Per class of Conv2d (depthwise, 1x1, other): [FLOPs, seconds] of one forward (eager
    CPU ops are synchronous, so hook times are the ops' times)."""
    import torch

    totals: dict[str, list[float]] = {
        "depthwise": [0, 0],
        "pointwise 1x1": [0, 0],
        "full kxk": [0, 0],
    }
    starts: dict[int, float] = {}

    def kind(m: torch.nn.Conv2d) -> str:
        if m.groups > 1 and m.groups == m.in_channels:
            return "depthwise"
        return "pointwise 1x1" if m.kernel_size == (1, 1) else "full kxk"

    def pre(m: Any, _inp: Any) -> None:
        starts[id(m)] = time.perf_counter()

    def post(m: Any, _inp: Any, out: Any) -> None:
        k = kind(m)
        totals[k][1] += time.perf_counter() - starts[id(m)]
        kh, kw = m.kernel_size
        totals[k][0] += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        totals["whole forward"] = [0, time.perf_counter() - start]
    for h in handles:
        h.remove()
    return totals


def roofline_section(args: argparse.Namespace, workdir: Path) -> list[str]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from retrieval.bundle.model_export import export_model
    from retrieval.bundle.runtime import load_runtime
    from retrieval.index import EmbeddingIndex
    from retrieval.models import Embedder, create_backbone

    reps = 3 if args.quick else args.roofline_repeats
    threads = torch.get_num_threads()
    g = args.gemm_n
    peak = {t: gemm_flops(g, t, reps * 2) for t in sorted({threads, 1})}
    ceiling = peak[threads]
    bw = bandwidth(reps)
    bw_ceiling = max(bw.values())
    lines = [
        "## Roofline",
        "",
        f"torch {torch.__version__}, {threads} intra-op threads (torch default). FLOPs: "
        "`torch.utils.flop_counter.FlopCounterMode`, a multiply-add counted as 2 FLOPs; it "
        "counts convolutions and matmuls only (BatchNorm, activations, pooling are not counted).",
        "",
        "| ceiling | measured |",
        "|---|---|",
        *[
            f"| float32 GEMM torch.mm {g}x{g}, {t} thread(s) | {f / 1e9:.1f} GFLOP/s |"
            for t, f in peak.items()
        ],
        *[f"| memory bandwidth, {k} | {v / 1e9:.1f} GB/s |" for k, v in bw.items()],
        "",
    ]

    def embedder(channels_last: bool) -> Embedder:
        torch.manual_seed(0)
        backbone = create_backbone("tf_efficientnet_lite0", pretrained=True)
        return Embedder(
            backbone, embedding_dim=512, pooling="gem", channels_last=channels_last
        ).eval()

    models = {True: embedder(True), False: embedder(False)}
    sizes = (64, 128) if args.quick else (224, 128, 64)
    flops = {}
    for s in sizes:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            models[True](torch.randn(1, 3, s, s))
        flops[s] = float(counter.get_total_flops())
    main = sizes[0]
    bundle = workdir / "bundle"
    bundle.mkdir()
    config = {
        "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
        "embedder": {"embedding_dim": 512, "pooling": "gem", "head_bn": False},
    }
    export_model(models[False], bundle, config, main)
    onnx = load_runtime(bundle, kind="onnx", device="cpu")
    try:
        openvino = load_runtime(bundle, kind="openvino", device="cpu")
    except ValueError as err:  # not installed: its rows are left out, and said so
        print(f"roofline: {err}", file=sys.stderr)
        openvino = None

    # configs: (label, size, batch, fn); alternated within each repeat
    configs = []
    for batch in (32, 64):
        x = torch.randn(batch, 3, main, main)
        for cl in (True, False):
            configs.append(
                (
                    f"Embedder eager, channels_last={'on' if cl else 'off'}",
                    main,
                    batch,
                    lambda m=models[cl], x=x: m(x),
                )
            )
        xn = x.numpy()
        configs.append(("bundle ONNX Runtime (CPU EP)", main, batch, lambda xn=xn: onnx.embed(xn)))
        if openvino is not None:
            run = openvino.embed
            configs.append(("bundle OpenVINO (CPU, f32)", main, batch, lambda xn=xn, r=run: r(xn)))
    for s in sizes[1:]:
        x = torch.randn(64, 3, s, s)
        configs.append(("Embedder eager, channels_last=on", s, 64, lambda x=x: models[True](x)))
    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    with torch.inference_mode():
        for _, _, _, fn in configs:
            fn()
        for _ in range(reps):
            for i, (_, _, _, fn) in enumerate(configs):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
    lines += [
        "FLOPs per image (tf_efficientnet_lite0 + GeM + Linear 1280->512): "
        + ", ".join(f"{s} px: {flops[s] / 1e9:.3f} GFLOP" for s in sizes)
        + ".",
        "",
        f"| embedding ({reps} alternating repeats, median) | input | batch | images/s "
        f"| GFLOP/s | share of GEMM ({threads} threads) |",
        "|---|---|---|---|---|---|",
    ]
    best = 0.0
    for i, (label, s, batch, _) in enumerate(configs):
        ips = batch / statistics.median(times[i])
        share = ips * flops[s] / ceiling
        if s == main:
            best = max(best, share)
        lines.append(
            f"| {label} | {s} | {batch} | {ips:.1f} | {ips * flops[s] / 1e9:.1f} "
            f"| {100 * share:.1f}% |"
        )
    lines += [
        "",
        f"Goal: embedding >= 40% of the GEMM roofline at {main} px: best "
        f"{100 * best:.1f}%, {'met' if best >= 0.4 else 'not met'}.",
        "",
    ]
    split = conv_classes(models[True], torch.randn(64, 3, main, main))
    forward = split.pop("whole forward")[1]
    total_t = sum(v[1] for v in split.values())
    lines += [
        f"Where the time goes (one batch of 64 at {main} px, channels_last on, hooks on each "
        "Conv2d; eager timm runs BatchNorm + ReLU6 as separate, uncounted ops):",
        "",
        "| convolutions | GFLOP per image | share of FLOPs | share of conv time | GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    total_f = sum(v[0] for v in split.values())
    for k, (fl, sec) in split.items():
        lines.append(
            f"| {k} | {fl / 64 / 1e9:.3f} | {100 * fl / total_f:.1f}% "
            f"| {100 * sec / total_t:.1f}% | {fl / sec / 1e9:.1f} |"
        )
    lines += [
        "",
        f"Convolutions take {100 * total_t / forward:.0f}% of that forward's "
        f"{forward:.2f} s; the rest is BatchNorm, ReLU6, pooling, head and layout.",
    ]

    # exact search
    n, d = (20_000, DIM) if args.quick else (100_000, DIM)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, 256, replace=False)] + 0.01
    index = EmbeddingIndex(d, "Flat", use_gpu=False)
    index.add(xb)
    one = median_time(lambda: [index.search(xq[i : i + 1], 10) for i in range(16)], reps) / 16
    many = median_time(lambda: index.search(xq, 10), reps)
    per_query = n * d * 4
    lines += [
        "",
        f"| exact search, EmbeddingIndex Flat {n:,} x {d}, k = 10 | queries/s | achieved "
        "| ceiling | share |",
        "|---|---|---|---|---|",
        f"| batch 1 (memory-bound: {per_query / 1e6:.0f} MB read a query) | {1 / one:.1f} "
        f"| {per_query / one / 1e9:.1f} GB/s | {bw_ceiling / 1e9:.1f} GB/s "
        f"| {100 * per_query / one / bw_ceiling:.0f}% |",
        f"| batch 256 (compute-bound: {2 * n * d / 1e6:.0f} MFLOP a query) | {256 / many:.1f} "
        f"| {2 * n * d * 256 / many / 1e9:.1f} GFLOP/s | {ceiling / 1e9:.1f} GFLOP/s "
        f"| {100 * 2 * n * d * 256 / many / ceiling:.0f}% |",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------- main


def versions() -> str:
    out = []
    for name in (
        "torch",
        "numpy",
        "faiss-cpu",
        "open-metric-learning",
        "pytorch-metric-learning",
        "onnxruntime",
        "openvino",
        "timm",
    ):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} missing")
    return ", ".join(out)


def script_section(script: str, options: list[str]) -> Callable[..., list[str]]:
    """A section run by another script of ``scripts/`` in a child process, its report
    (what it writes with ``--record``) taken into this one."""

    def run(args: argparse.Namespace, workdir: Path) -> list[str]:
        report = workdir / f"{script}.md"
        cmd = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *options]
        if args.quick:
            cmd += QUICK_OPTIONS[script]
        subprocess.run([*cmd, "--record", str(report)], check=True, cwd=ROOT)
        return report.read_text().splitlines()

    return run


QUICK_OPTIONS = {
    "peers_training": ["--steps", "3", "--warmup", "1", "--repeats", "1"],
    "peers_indexing": ["--images", "32", "--large", "2", "--repeats", "1"],
}
SECTION_RUNNERS: dict[str, Callable[..., list[str]]] = {
    "eval": lambda args, workdir: eval_section(args, workdir),
    "roofline": lambda args, workdir: roofline_section(args, workdir),
    "training": script_section("peers_training", []),
    "indexing": script_section("peers_indexing", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable); default: all",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the logic")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_502, 120_000])
    parser.add_argument("--protocols", nargs="+", choices=("loo", "qg"), default=["loo", "qg"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--repeat-below", type=int, default=70_000, help="sizes above this run once"
    )
    parser.add_argument(
        "--peer-max-n", type=int, default=10**9, help="peers are not run above this gallery size"
    )
    parser.add_argument("--max-rss-gb", type=float, default=16.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--gemm-n", type=int, default=2048)
    parser.add_argument("--roofline-repeats", type=int, default=5)
    parser.add_argument("--record", type=Path, help="write the report to this markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--protocol", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(eval_child(args.child, args.data, args.protocol)))
        return
    if args.quick:
        args.sizes, args.repeats = [2_000, 5_000], 2
    sections = args.only or list(SECTIONS)
    load_start = os.getloadavg()
    command = shlex.join([Path(sys.executable).as_posix(), *sys.argv])
    header = [
        f"# bench_peers on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
        f"python {platform.python_version()}",
        f"- versions: {versions()}",
        f"- command: `{command}`",
        f"- load average (1/5/15 min) at the start: {' / '.join(f'{v:.2f}' for v in load_start)}",
        "",
    ]
    body: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        for section in sections:
            start = time.perf_counter()
            part = SECTION_RUNNERS[section](args, Path(tmp))
            body += part  # written after each section, so a later failure keeps it
            if args.record:
                args.record.write_text("\n".join([*header, *body]))
            part = []
            part.append(
                f"({section}: {time.perf_counter() - start:.0f} s, load average after: "
                f"{os.getloadavg()[0]:.2f})"
            )
            print("\n".join(part), flush=True)
            body += [*part, ""]
    text = "\n".join([*header, *body])
    print(text)
    if args.record:
        args.record.write_text(text)


if __name__ == "__main__":
    main()

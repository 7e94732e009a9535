"""Device check for one GPU: what this framework gets out of the card, in one table.

(a) training images/s: our Embedder (ResNet-50, 224 px, GeM, 512-d head) with the
    multi-similarity loss and miner, bf16 autocast, channels_last, AdamW, synthetic P x K
    batches, in a plain PyTorch loop (no Lightning, no data loading). Random init: a
    throughput check only, nothing is downloaded.
(b) embedding images/s: the same Embedder in inference mode, bf16 autocast.
(c) exact search queries/s over 1,000,000 x 512 unit vectors, k=10: a FAISS GPU Flat index
    when faiss has GPU support, else torch matmul + top-k on the GPU (the table says which);
    its top-10 is checked against CPU FAISS on a few queries.

Each part runs in its own subprocess with a time limit: a part that fails, runs out of memory or
overruns prints as a FAILED row and the others still run. The exit status is 1 if any part failed.

    bash scripts/device_check.sh [--out DIR]    # GPU: about 2-4 min, at most ~9 min
    bash scripts/device_check.sh --dry-run      # CPU, tiny sizes: checks the logic in seconds

``--out DIR`` (default ``$OUT`` when set) also writes ``device_check.json`` and
``device_check.md`` there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("train", "embed", "search")
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "backbone": "resnet50",
        "image_size": 224,
        "labels_per_batch": 64,  # P x K = 256 images per training step
        "samples_per_label": 4,
        "embed_batch": 512,
        "warmup_steps": 10,
        "max_steps": 200,
        "budget_s": 60.0,  # timed seconds per measurement, at most
        "vectors": 1_000_000,
        "dim": 512,
        "queries": 10_000,
        "query_chunk": 1024,
        "check_queries": 32,
        "timeout_s": {"train": 200, "embed": 150, "search": 180},
    },
    "dry": {
        "backbone": "resnet18",
        "image_size": 32,
        "labels_per_batch": 2,
        "samples_per_label": 2,
        "embed_batch": 4,
        "warmup_steps": 1,
        "max_steps": 2,
        "budget_s": 2.0,
        "vectors": 20_000,
        "dim": 64,
        "queries": 200,
        "query_chunk": 64,
        "check_queries": 8,
        "timeout_s": {"train": 120, "embed": 120, "search": 120},
    },
}
K = 10
EMBEDDING_DIM = 512
MIN_STEPS = 2  # timed steps or search runs, even past the time budget


def device_and_autocast(dry_run: bool) -> tuple[Any, Any]:
    """``(device, autocast context factory)``: CUDA with bf16, or the CPU (bf16) in a dry run."""
    import torch

    if dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise RuntimeError("no CUDA device visible (run with --dry-run to check on a CPU)")
    return device, lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(step: Callable[[], int], device: Any, size: dict[str, Any]) -> dict[str, Any]:
    """Run ``step`` (returns the items it processed) ``warmup_steps`` times untimed, then until
    ``max_steps`` or ``budget_s`` seconds (``MIN_STEPS`` at least); items per second of the
    timed steps."""
    for _ in range(size["warmup_steps"]):
        step()
    synchronize(device)
    items, steps, start = 0, 0, time.perf_counter()
    deadline = start + size["budget_s"]
    while steps < size["max_steps"] and (steps < MIN_STEPS or time.perf_counter() < deadline):
        items += step()
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"value": items / seconds, "steps": steps, "seconds": round(seconds, 3)}


def build_embedder(size: dict[str, Any], device: Any) -> Any:
    from retrieval.models import Embedder, create_backbone

    backbone = create_backbone(size["backbone"], pretrained=False)  # random init: no download
    return Embedder(backbone, EMBEDDING_DIM, pooling="gem", channels_last=True).to(device)


def peak_memory(device: Any) -> str:
    import torch

    if device.type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def part_train(size: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    import torch
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    from retrieval.training.losses import compute_loss

    device, autocast = device_and_autocast(dry_run)
    model = build_embedder(size, device).train()
    loss_fn, miner = MultiSimilarityLoss(), MultiSimilarityMiner()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    p, k, side = size["labels_per_batch"], size["samples_per_label"], size["image_size"]
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(p * k, 3, side, side, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(p, device=device).repeat_interleave(k)

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            embeddings = model(images)
        compute_loss(loss_fn, miner, embeddings, labels).backward()  # the loss in float32
        optimizer.step()
        return p * k

    result = timed_loop(step, device, size)
    result["details"] = (
        f"{size['backbone']} random init, {side} px, batch {p}x{k}, bf16 autocast, "
        f"channels_last, multi-similarity loss+miner, AdamW; {result['steps']} timed steps"
        + peak_memory(device)
    )
    return result


def part_embed(size: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    import torch

    device, autocast = device_and_autocast(dry_run)
    model = build_embedder(size, device).eval()
    batch, side = size["embed_batch"], size["image_size"]
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, side, side, device=device, generator=generator)

    def step() -> int:
        with torch.inference_mode(), autocast():
            model(images)
        return batch

    result = timed_loop(step, device, size)
    result["details"] = (
        f"{size['backbone']} random init, {side} px, batch {batch}, inference_mode, bf16 "
        f"autocast, channels_last; {result['steps']} timed batches" + peak_memory(device)
    )
    return result


def part_search(size: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from retrieval.index import EmbeddingIndex
    from retrieval.index.faiss_runtime import gpu_available, import_faiss

    device, _ = device_and_autocast(dry_run)
    n, dim, nq, chunk = size["vectors"], size["dim"], size["queries"], size["query_chunk"]
    generator = torch.Generator(device=device).manual_seed(0)
    xb = torch.nn.functional.normalize(
        torch.randn(n, dim, device=device, generator=generator), dim=1
    )
    xq = torch.nn.functional.normalize(
        torch.randn(nq, dim, device=device, generator=generator), dim=1
    )
    xb_np, xq_np = xb.cpu().numpy(), xq.cpu().numpy()
    faiss = import_faiss()
    if device.type == "cuda" and gpu_available(faiss):
        method = "FAISS GPU IndexFlatIP"
        index = EmbeddingIndex(dim, "Flat", use_gpu=True)
        index.add(xb_np)

        def search() -> np.ndarray:
            return index.search(xq_np, K, chunk_size=chunk)[1]
    else:
        why = "no GPU in faiss" if device.type == "cuda" else "dry run on the CPU"
        method = f"torch matmul + topk on {device.type} fp32 ({why})"

        def search() -> np.ndarray:
            ids = []
            for start in range(0, nq, chunk):
                ids.append(torch.topk(xq[start : start + chunk] @ xb.T, K, dim=1).indices)
            synchronize(device)
            return torch.cat(ids).cpu().numpy()

    search()  # warm-up (kernels, cuBLAS handles)
    times: list[float] = []
    deadline = time.perf_counter() + size["budget_s"]
    while len(times) < size["max_steps"] and (
        len(times) < MIN_STEPS or time.perf_counter() < deadline
    ):
        start = time.perf_counter()
        found = search()
        times.append(time.perf_counter() - start)
    check = size["check_queries"]
    reference = EmbeddingIndex(dim, "Flat", use_gpu=False)
    reference.add(xb_np)
    _, expected = reference.search(xq_np[:check], K)
    hits = [len(set(a) & set(b)) for a, b in zip(found[:check], expected, strict=True)]
    agree = sum(hits) / (K * check)
    seconds = statistics.median(times)
    return {
        "value": nq / seconds,
        "seconds": round(seconds, 4),
        "method": method,
        "agreement": agree,
        "details": (
            f"{method}; {n:,} x {dim} fp32 unit vectors, {nq:,} queries in chunks of {chunk}, "
            f"k={K}, median of {len(times)} runs; top-{K} overlap with CPU FAISS exact search "
            f"{agree:.1%} over {check} queries" + peak_memory(device)
        ),
    }


PART_FUNCTIONS = {"train": part_train, "embed": part_embed, "search": part_search}


def titles(size: dict[str, Any]) -> dict[str, tuple[str, str]]:
    name, side = size["backbone"], size["image_size"]
    return {
        "train": (f"training {name} {side}px bf16", "images/s"),
        "embed": (f"embedding {name} {side}px bf16", "images/s"),
        "search": (f"exact search {size['vectors']:,} x {size['dim']}, k={K}", "queries/s"),
    }


def run_part(part: str, args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
    """Run one part in a fresh process under its time limit; a failure becomes the row."""
    limit = size["timeout_s"][part]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--part", part, "--result", str(result_file)]
        if args.dry_run:
            command.append("--dry-run")
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"TIMEOUT: still running after {limit} s"}
        if result_file.is_file():
            result: dict[str, Any] = json.loads(result_file.read_text())
        else:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            result = {"ok": False, "error": f"exit status {done.returncode}: {lines[-1]}"}
        if not result["ok"]:
            sys.stderr.write(f"--- part {part} failed; its output:\n{done.stderr[-4000:]}\n")
        result["wall_s"] = round(time.perf_counter() - started, 1)
        return result


def child(part: str, result_file: Path, dry_run: bool) -> int:
    """Inside the subprocess: measure ``part``, write its JSON result (or its error)."""
    size = SIZES["dry" if dry_run else "full"]
    try:
        result = {"ok": True, **PART_FUNCTIONS[part](size, dry_run)}
    except Exception as err:  # the error is the result, printed in the table
        traceback.print_exc()
        message = " ".join(str(err).split())[:200]
        result = {"ok": False, "error": f"{type(err).__name__}: {message}"}
    result_file.write_text(json.dumps(result))
    return 0


def environment(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": dry_run,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import faiss

        gpu = hasattr(faiss, "StandardGpuResources")
        info["faiss"] = f"{faiss.__version__} ({'with GPU support' if gpu else 'CPU only'})"
    except ImportError:
        info["faiss"] = "not installed"
    return info


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| measurement | value | unit | details |",
        "|---|---:|---|---|",
    ]
    for row in rows:
        value = f"{row['value']:,.1f}" if row["ok"] else "FAILED"
        details = str(row["details"] if row["ok"] else row["error"]).replace("|", "\\|")
        lines.append(f"| {row['name']} | {value} | {row['unit']} | {details} |")
    return "\n".join(lines)


def report(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ", ".join(f"{k} {v}" for k, v in info.items() if k != "dry_run")
    mode = (
        "DRY RUN on the CPU, tiny sizes: checks the script, not the device"
        if info["dry_run"]
        else "random-init weights: throughput only, no download"
    )
    return f"# Device check\n\n{head}\n\n{mode}\n\n{table(rows)}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return child(args.part, args.result, args.dry_run)

    size = SIZES["dry" if args.dry_run else "full"]
    names = titles(size)
    rows = []
    for part in args.only or PARTS:
        print(f"device check: {part} ...", file=sys.stderr, flush=True)
        result = run_part(part, args, size)
        rows.append({"part": part, "name": names[part][0], "unit": names[part][1], **result})
    info = environment(args.dry_run)
    text = report(info, rows)
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device_check.md").write_text(text)
        (args.out / "device_check.json").write_text(
            json.dumps({"environment": info, "rows": rows}, indent=2) + "\n"
        )
        print(f"written: {args.out / 'device_check.md'}, {args.out / 'device_check.json'}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the ``inference.runtime`` choices of evaluate.py, export.py and embed.py.

Two measurements per runtime (eager PyTorch, ONNX Runtime, OpenVINO, TorchScript):

- the model alone: images per second of ``--images`` random (3, S, S) inputs in batches of
  ``--batch-size``, after one warm-up batch, through the module that embeds (for the exported
  runtimes, :func:`retrieval.bundle.model_export.compiled_embedder`), and how long exporting
  and checking the model took;
- ``evaluate.py`` end to end on the built-in demo (the backbone as-is, no cache): wall time of
  the whole command and the time its embedding loop reports.

Medians over ``--repeats`` rounds, the runtimes taking turns within a round.

    python scripts/bench_inference.py                       # efficientnet_lite0, 224 px
    python scripts/bench_inference.py --quick               # small sizes: checks the logic
    python scripts/bench_inference.py --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._machine import cpu_model  # noqa: E402

RUNTIMES = ("eager", "onnx", "openvino", "torchscript")


def model_alone(runtime: str, size: int, images: int, batch: int) -> tuple[float, float]:
    """(images per second, seconds to export and check) of the backbone as-is."""
    from retrieval.bundle.model_export import compiled_embedder
    from retrieval.models import Embedder, create_backbone

    embedder = Embedder(create_backbone("tf_efficientnet_lite0"), None, "avg").eval()
    start = time.perf_counter()
    config = {
        "backbone": {"name": "tf_efficientnet_lite0", "source": "timm", "kwargs": {}},
        "embedder": {"embedding_dim": None, "pooling": "avg"},
    }
    module = embedder if runtime == "eager" else compiled_embedder(embedder, config, size, runtime)
    export_s = time.perf_counter() - start
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        module(x)
        start = time.perf_counter()
        for _ in range(max(1, images // batch)):
            module(x)
    return max(1, images // batch) * batch / (time.perf_counter() - start), export_s


def evaluate_end_to_end(runtime: str, work: Path, max_labels: int) -> tuple[float, float]:
    """(wall seconds of evaluate.py, seconds of its embedding loop) on the demo."""
    out = work / f"eval-{runtime}"
    command = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"inference.runtime={runtime}",
        "inference.use_cache=false",
        "data=demo",
        f"data.max_labels={max_labels}",
        "logger=csv",
        "metrics=[recall]",
        f"paths.data_dir={work}/data",
        f"paths.log_dir={work}/logs",
        f"paths.output_dir={out}",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    found = re.findall(r"embedding: \d+ batches in ([\d.]+) s", done.stdout + done.stderr)
    return wall, float(found[-1]) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the logic")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-labels", type=int, default=100, help="demo labels evaluated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtimes", nargs="*", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--record", type=Path, help="write the report to this markdown file")
    args = parser.parse_args()
    if args.quick:
        args.size, args.images, args.batch_size, args.max_labels, args.repeats = 64, 64, 16, 8, 1
    alone: dict[str, list[tuple[float, float]]] = {r: [] for r in args.runtimes}
    e2e: dict[str, list[tuple[float, float]]] = {r: [] for r in args.runtimes}
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as folder:
        work = Path(folder)
        evaluate_end_to_end("eager", work, args.max_labels)  # generates the demo, warms caches
        for _ in range(args.repeats):
            for runtime in args.runtimes:
                alone[runtime].append(model_alone(runtime, args.size, args.images, args.batch_size))
                e2e[runtime].append(evaluate_end_to_end(runtime, work, args.max_labels))

    def med(rows: list[tuple[float, float]], i: int) -> float:
        return statistics.median(row[i] for row in rows)

    base_rate, base_loop = med(alone["eager"], 0), med(e2e["eager"], 1)
    lines = [
        f"# inference.runtime on {cpu_model()} ({os.cpu_count()} CPUs), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        f"`python scripts/bench_inference.py {' '.join(sys.argv[1:])}`; tf_efficientnet_lite0, "
        f"{args.size} px for the model alone ({args.images} images, batch {args.batch_size}); "
        f"evaluate.py on the demo ({args.max_labels} labels, its own image size); medians of "
        f"{args.repeats}.",
        "",
        "| runtime | model alone img/s | vs eager | export + check s | evaluate.py wall s "
        "| its embedding loop s | loop vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for runtime in args.runtimes:
        rate, loop = med(alone[runtime], 0), med(e2e[runtime], 1)
        lines.append(
            f"| {runtime} | {rate:.1f} | {rate / base_rate:.2f}x | {med(alone[runtime], 1):.1f} "
            f"| {med(e2e[runtime], 0):.1f} | {loop:.2f} | {base_loop / loop:.2f}x |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.record:
        args.record.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()

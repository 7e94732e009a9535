"""Benchmark: the cost of distributed data parallel training on the CPU (gloo).

Step time of 2 DDP processes against 1 process at the same per-rank batch (P x K), with the
framework's own objects (Embedder, RetrievalModule, PK sampler, Lightning Trainer, the settings of
``trainer=ddp_cpu``). Images are synthetic tensors held in memory, so the figures are model,
loss and communication time, not JPEG decoding. Every configuration runs in a fresh process
(Lightning re-runs this script for the second DDP rank); step times are wall-clock intervals
between the ends of consecutive steps on rank 0, median over the steps after ``--warmup``.

    python scripts/bench_ddp.py               # one round: ~5 min on 2 busy cores, less if quiet
    python scripts/bench_ddp.py --repeats 2   # configurations alternate (10.5 min, 2 busy cores)
    python scripts/bench_ddp.py --steps 3 --warmup 1 --image-size 64  # checks the logic (1.5 min)

Rows: 1 process with 1 thread is the per-rank reference (each DDP rank gets one of the two
cores); 2 processes with 1 thread each show the DDP overhead (gradient all-reduce, the
synchronisation of the slower rank) and the throughput it buys; ``gather`` adds
``gather_embeddings`` (the loss over both ranks' embeddings); 1 process with 2 threads is the
other way to use the same two cores.
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
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _machine import cpu_model  # noqa: E402  (scripts/ is on sys.path)

CONFIGS = (  # (name, processes, threads per process, gather_embeddings)
    ("1 process, 1 thread", 1, 1, False),
    ("2 processes (gloo), 1 thread each", 2, 1, False),
    ("2 processes (gloo), 1 thread each, gather_embeddings", 2, 1, True),
    ("1 process, 2 threads", 1, 2, False),
)


def _worker(args: argparse.Namespace) -> None:
    """One configuration; every DDP rank runs this (Lightning starts rank 1 as ``sys.argv``)."""
    import torch

    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner
    from torch.utils.data import DataLoader, Dataset

    from retrieval.data.sampler import PKBatchSampler
    from retrieval.models import Embedder, create_backbone
    from retrieval.training.module import RetrievalModule

    num_labels, per_label = 32, 8
    labels = [i // per_label for i in range(num_labels * per_label)]
    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    images = torch.randn(len(labels), 3, size, size, generator=generator)

    class Synthetic(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"image": images[i], "label": labels[i], "index": i}

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            trainer = self.trainer
            assert trainer is not None
            sampler = PKBatchSampler(
                labels,
                args.p,
                args.k,
                batches_per_epoch=trainer.world_size * (args.warmup + args.steps + 1),
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
            )
            return DataLoader(Synthetic(), batch_sampler=sampler, num_workers=0)

    class Stopwatch(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *_: Any) -> None:
            self.ends.append(time.perf_counter())

    pl.seed_everything(0, verbose=False)
    module = RetrievalModule(
        Embedder(create_backbone(args.backbone, pretrained=False), 512, "gem"),
        loss=MultiSimilarityLoss(),
        miner=MultiSimilarityMiner(),
        optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4),
        gather_embeddings=args.gather,
    )
    watch = Stopwatch()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.processes,
        strategy="ddp" if args.processes > 1 else "auto",
        use_distributed_sampler=False,
        precision="32-true",
        max_steps=args.warmup + args.steps + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watch],
    )
    trainer.fit(module, datamodule=Data())
    if trainer.is_global_zero:
        steps = [b - a for a, b in zip(watch.ends, watch.ends[1:], strict=False)][args.warmup :]
        Path(args.out).write_text(json.dumps({"step_s": steps}))


def _run(args: argparse.Namespace, processes: int, threads: int, gather: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "steps.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"--out={out}"]
        command += [f"--processes={processes}", f"--threads={threads}"]
        command += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in _SHARED]
        command += ["--gather"] if gather else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return list(json.loads(out.read_text())["step_s"])


_SHARED = ("steps", "warmup", "image_size", "p", "k", "backbone")


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before them")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--p", type=int, default=8, help="labels per batch, per rank")
    parser.add_argument("--k", type=int, default=4, help="images per label")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configurations")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gather", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    batch = args.p * args.k
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- machine: {_machine()} (before the runs)")
    print(f"- python {platform.python_version()}, torch {torch.__version__}")
    print(
        f"- settings: backbone={args.backbone} (random init), image_size={args.image_size}, "
        f"per-rank batch P={args.p} x K={args.k} = {batch}, MultiSimilarity loss + miner, "
        f"AdamW, fp32, {args.steps} timed steps after {args.warmup} untimed"
    )
    steps: dict[str, list[float]] = {name: [] for name, *_ in CONFIGS}
    load: dict[str, float] = dict.fromkeys(steps, 0.0)
    for _ in range(args.repeats):  # alternate, so that a noisy minute hits every configuration
        for name, processes, threads, gather in CONFIGS:
            load[name] = max(load[name], os.getloadavg()[0])
            steps[name] += _run(args, processes, threads, gather)
    reference = statistics.median(steps[CONFIGS[0][0]])
    print(f"- repeats: {args.repeats}; load average after the runs: {os.getloadavg()[0]:.2f}\n")
    print(
        "| configuration | step ms (median) | min | max | images/s | step time vs "
        "1 process, 1 thread | load avg before |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, processes, *_ in CONFIGS:
        median, low, high = statistics.median(steps[name]), min(steps[name]), max(steps[name])
        print(
            f"| {name} | {median * 1e3:.0f} | {low * 1e3:.0f} | {high * 1e3:.0f} "
            f"| {processes * batch / median:.1f} | {median / reference:.2f} x "
            f"| {load[name]:.2f} |"
        )


if __name__ == "__main__":
    main()

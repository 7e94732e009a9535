"""Benchmark: training and data-loading throughput, each beside a plain baseline.

Our Lightning training vs a plain PyTorch loop doing the same steps on the same batches from the
same weights; the training DataLoader vs raw PIL decoding (and ``open_rgb``) of the same files.
The first ``--warmup-steps`` of each run are not timed; runs alternate ``--repeats`` times.
Usage: ``python scripts/bench_train.py [--quick] [--output bench.md] [hydra.key=value ...]``;
``--recipe experiment=copydetect``: that recipe's step against the whole network in float32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _machine import cpu_model  # scripts/ is on sys.path when this runs
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from retrieval.data.datamodule import RetrievalDataModule
from retrieval.data.images import open_rgb
from retrieval.tasks.config import compose_config
from retrieval.tasks.train import build
from retrieval.training.losses import compute_loss
from retrieval.training.module import RetrievalModule

REPO = Path(__file__).resolve().parents[1]
Args = argparse.Namespace


def _cycle(batches: Iterable[Any], sampler: Any, steps: int) -> Iterator[Any]:
    """``steps`` items of ``batches``, iterated epoch after epoch; ``sampler.set_epoch`` is
    called before each epoch, as ``RetrievalModule.on_train_epoch_start`` does."""

    def epochs() -> Iterator[Any]:
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from batches

    return itertools.islice(epochs(), steps)


class Stopwatch(pl.Callback):
    """Times the images of steps ``warmup + 1`` to ``steps`` (1-based) and records the dataset
    indices of every step; a Lightning callback, or ticked by hand from a plain loop."""

    def __init__(self, args: Args, device: str | torch.device = "cpu") -> None:
        self.warmup, self.steps, self.device = args.warmup_steps, args.steps, torch.device(device)
        self.images, self.indices = 0, list[list[int]]()
        self.marks = list[float]()  # perf_counter() at the end of steps warmup and steps

    def tick(self, step: int, indices: list[int]) -> None:
        self.indices.append(indices)
        self.images += len(indices) if step > self.warmup else 0
        if step in (self.warmup, self.steps):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.tick(trainer.global_step, args[2]["index"].tolist())

    @property
    def speed(self) -> float:
        return self.images / (self.marks[1] - self.marks[0])


def run_lightning(cfg: DictConfig, pristine: RetrievalModule, data: Any, args: Args) -> Stopwatch:
    watch = Stopwatch(args)
    # Training steps only: no validation, logger, checkpoints, progress bar or model summary.
    flags = {"max_steps": args.steps, "max_epochs": -1, "limit_val_batches": 0}
    flags |= {"num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False}
    flags |= {"enable_progress_bar": False, "enable_model_summary": False}
    trainer = instantiate(cfg.trainer, callbacks=[watch], **flags)
    watch.device = trainer.strategy.root_device  # where Lightning will move the module
    trainer.fit(copy.deepcopy(pristine), datamodule=data)
    return watch


def _optimizer(module: RetrievalModule) -> torch.optim.Optimizer:
    """The optimizer ``RetrievalModule.configure_optimizers`` builds (same groups and rates)."""
    model, loss_fn = module.model, module.loss
    base_lr = float(module.optimizer_factory.keywords["lr"])  # type: ignore[attr-defined]
    groups = [
        {"params": model.backbone_parameters(), "lr": base_lr},
        {"params": model.head_parameters(), "lr": base_lr * module.head_lr_multiplier},
        {"params": [p for p in loss_fn.parameters() if p.requires_grad], "lr": module.loss_lr},
    ]
    return module.optimizer_factory([g for g in groups if g["params"]])


def run_plain(pristine: RetrievalModule, data: Any, args: Args, device: torch.device) -> Stopwatch:
    """The same steps in plain PyTorch; the optimizer and schedule are built as
    ``RetrievalModule.configure_optimizers`` builds them (same factories, groups and rates)."""
    module = copy.deepcopy(pristine).to(device).train()
    model, loss_fn, miner = module.model, module.loss, module.miner
    optimizer = _optimizer(module)
    factory = module.scheduler_factory
    scheduler = factory(optimizer, total_steps=args.steps) if factory is not None else None
    loader = data.train_dataloader()
    watch = Stopwatch(args, device)
    for step, batch in enumerate(_cycle(loader, loader.batch_sampler, args.steps), start=1):
        optimizer.zero_grad(set_to_none=True)
        embeddings = model(batch["image"].to(device))
        loss = compute_loss(loss_fn, miner, embeddings, batch["label"].to(device))
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        watch.tick(step, batch["index"].tolist())
    return watch


def run_fixed_batch(
    pristine: RetrievalModule, batch: dict[str, Any], bf16: bool, args: Args
) -> tuple[Stopwatch, float]:
    """``args.steps`` optimizer steps on one batch (the model's compute alone, no data
    loading), in bf16 autocast as Lightning's ``bf16-mixed`` or in float32; and the loss of
    the first step, before any update."""
    module = copy.deepcopy(pristine).train()
    model, loss_fn, miner = module.model, module.loss, module.miner
    optimizer = _optimizer(module)
    images, labels = batch["image"], batch["label"]
    watch, first = Stopwatch(args), float("nan")
    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            embeddings = model(images)
        loss = compute_loss(loss_fn, miner, embeddings.float(), labels)
        loss.backward()
        optimizer.step()
        first = float(loss.detach()) if step == 1 else first
        watch.tick(step, batch["index"].tolist())
    return watch, first


def recipe_rows(cfg: DictConfig, args: Args) -> list[str]:
    """The recipe's training step (its frozen stages, bf16 where the CPU has it) against
    today's path (the whole network in float32), same model, same batch, same start: images/s
    and the loss of the first step, which must agree within bf16's tolerance."""
    plain = copy.deepcopy(cfg)
    plain.model.embedder.frozen_stages, plain.trainer.precision = 0, "32-true"
    recipe = build(cfg)  # the precision it trains in: bf16-mixed falls back without bf16
    today: RetrievalModule = build(plain)["module"]
    ours: RetrievalModule = recipe["module"]
    today.model.load_state_dict(ours.model.state_dict())  # the same start
    batch = next(iter(recipe["datamodule"].train_dataloader()))
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    name = (
        f"recipe step (frozen_stages={cfg.model.embedder.frozen_stages}, {cfg.trainer.precision})"
    )
    reference = "whole network, 32-true"
    speeds: dict[str, list[float]] = {name: [], reference: []}
    losses = {}
    for _ in range(args.repeats):
        for label, module, half in ((name, ours, bf16), (reference, today, False)):
            gc.collect()
            watch, losses[label] = run_fixed_batch(module, batch, half, args)
            speeds[label].append(watch.speed)
            print(f"  {label}: {watch.speed:.1f} img/s, first loss {losses[label]:.4f}", flush=True)
    gap = abs(losses[name] - losses[reference]) / abs(losses[reference])
    agree = "agree" if gap <= 0.02 else "DISAGREE"
    lines = table(speeds, {name: reference, reference: reference})
    return [
        *lines,
        "",
        f"First-step loss on the fixed batch: recipe {losses[name]:.4f}, "
        f"whole network {losses[reference]:.4f} (relative gap {gap:.4f}: {agree} within "
        f"bf16's 2%); batch {len(batch['index'])} images at "
        f"{tuple(batch['image'].shape[-2:])}, data loading not timed.",
    ]


def run_loader(data: RetrievalDataModule, args: Args) -> Stopwatch:
    """The training DataLoader alone: decode + augment + collate, in ``num_workers`` workers."""
    loader = data.train_dataloader()
    watch = Stopwatch(args)
    for step, batch in enumerate(_cycle(loader, loader.batch_sampler, args.steps), start=1):
        watch.tick(step, batch["index"].tolist())
    return watch


def run_decode(decode: Callable[[Path], Any], data: Any, batches: list, args: Args) -> Stopwatch:
    watch = Stopwatch(args)
    for step, indices in enumerate(batches, start=1):
        for i in indices:
            decode(data.train_set.rows[i].path)
        watch.tick(step, indices)
    return watch


def raw_pil(path: Path) -> None:
    with Image.open(path) as image:
        image.convert("RGB").load()


def describe(cfg: DictConfig, args: Args, device: torch.device) -> list[str]:
    cuda = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    sampler = cfg.sampler  # P x K labels (pk) or images x views (instance)
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.2f}",
        f"- python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), lightning {pl.__version__}, device {device}{cuda}",
        f"- settings: backbone={cfg.backbone.name}, image_size={cfg.data.image_size or 'default'}, "
        f"P={sampler.get('labels_per_batch', sampler.get('images_per_batch'))} x "
        f"K={sampler.get('samples_per_label', sampler.get('views_per_image'))}, "
        f"num_workers={cfg.data.num_workers}, precision={cfg.trainer.precision}, "
        f"steps={args.steps} (first {args.warmup_steps} not timed), repeats={args.repeats}",
        f"- data: {cfg.data.root}; extra overrides: {args.overrides or 'none'}",
    ]


def table(results: dict[str, list[float]], reference: dict[str, str]) -> list[str]:
    lines = ["| what | median img/s | min | max | ratio |", "|---|---:|---:|---:|---|"]
    for name, values in results.items():
        ratio = statistics.median(values) / statistics.median(results[reference[name]])
        shown = f"{ratio:.3f} x {reference[name]}" if reference[name] != name else "reference"
        cells = (statistics.median(values), min(values), max(values))
        lines.append(f"| {name} | {' | '.join(f'{v:.1f}' for v in cells)} | {shown} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement")
    parser.add_argument("--num-workers", type=int, help="data loader workers (default: config)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: config)")
    parser.add_argument("--backbone", help="config option, e.g. resnet18 (default: config)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--output", type=Path, help="markdown file to append the results to")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 1 repeat")
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="the config's training step (frozen stages, precision) against the whole network "
        "in float32 on one fixed batch, e.g. --recipe experiment=copydetect",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup_steps, args.repeats = 8, 3, 1
    if not 1 <= args.warmup_steps < args.steps:
        parser.error("need 1 <= --warmup-steps < --steps")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    overrides = [f"paths.data_dir={args.data_dir.resolve()}", "logger=csv"]
    overrides += [f"paths.output_dir={Path(tempfile.gettempdir(), 'bench_train')}"]  # unused
    overrides += ["model.frozen_backbone_epochs=0"]  # full fine-tuning steps only
    options = {"backbone": args.backbone, "data.image_size": args.image_size}
    options["data.num_workers"] = args.num_workers
    overrides += [f"{key}={value}" for key, value in options.items() if value is not None]
    cfg = compose_config(overrides + args.overrides)
    if args.recipe:
        return write_recipe(cfg, args)
    if cfg.trainer.precision != "32-true":
        raise SystemExit("the plain loop runs in float32: use trainer.precision=32-true")
    objects = build(cfg)  # reads the data and builds the module exactly as train.py does
    data: RetrievalDataModule = objects["datamodule"]
    pristine: RetrievalModule = objects["module"]  # never trained: every run copies it
    device = objects["trainer"].strategy.root_device
    header = describe(cfg, args, device)
    print("\n".join(header), flush=True)
    sampler = data.train_dataloader().batch_sampler
    batches = list(_cycle(sampler, sampler, args.steps))  # what every run must go through

    ours, plain = "Lightning trainer.fit (ours)", "plain PyTorch loop"
    loader = f"training DataLoader ({cfg.data.num_workers} workers)"
    ours_rgb, pil = "open_rgb (1 process)", "raw PIL open+convert (1 process)"
    runs: dict[str, Callable[[], Stopwatch]] = {
        ours: lambda: run_lightning(cfg, pristine, data, args),
        plain: lambda: run_plain(pristine, data, args, device),
        loader: lambda: run_loader(data, args),
        ours_rgb: lambda: run_decode(open_rgb, data, batches, args),
        pil: lambda: run_decode(raw_pil, data, batches, args),
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        for name, run in runs.items():
            gc.collect()
            torch.manual_seed(cfg.seed)
            watch = run()
            if watch.indices != batches:
                raise RuntimeError(f"{name} went through other batches than the sampler's")
            results[name].append(watch.speed)
            print(f"  {name}: {watch.speed:.1f} img/s", flush=True)

    lines = table(results, {ours: plain, plain: plain, loader: pil, ours_rgb: pil, pil: pil})
    print("\n" + "\n".join(lines), flush=True)
    if args.output is not None:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write("\n## bench_train\n\n" + "\n".join([*header, "", *lines]) + "\n")


def write_recipe(cfg: DictConfig, args: Args) -> None:
    header = describe(cfg, args, torch.device("cpu"))
    print("\n".join(header), flush=True)
    lines = recipe_rows(cfg, args)
    print("\n" + "\n".join(lines), flush=True)
    if args.output is not None:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write("\n## bench_train --recipe\n\n" + "\n".join([*header, "", *lines]) + "\n")


if __name__ == "__main__":
    main()

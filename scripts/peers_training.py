"""Training throughput beside the peers: the same model, data, P x K batch, loss and miner.

Four ways to train one EfficientNet-Lite0 Embedder (ImageNet weights from the installed package,
GeM + 512-d head, frozen BatchNorm) with pytorch-metric-learning's Multi-Similarity loss and
miner, AdamW (head 10x the backbone's learning rate), on the demo data's training split with
this project's training transform, P x K = 8 x 4 images a batch, data loaded in the main process:

- ``ours``: ``retrieval.tasks.train`` as ``python train.py`` runs it (Lightning, our module);
- ``plain``: a hand-written PyTorch loop over the same data loader;
- ``pml``: pytorch-metric-learning's ``trainers.MetricLossOnly`` (its MPerClassSampler, m = 4);
- ``oml``: open-metric-learning's Lightning ``ExtractorModule`` under its pytorch-lightning
  (<= 2.1.2) Trainer, with its ``BalanceSampler`` (8 labels x 4 instances).

Each runs ``--warmup`` steps, then ``--steps`` timed ones (the time between consecutive ends of
a step: data, forward, loss, backward, update); the ways take turns for ``--repeats`` rounds and
the median step time of each gives images/s. Before timing, the loss of one fixed batch from
the same initial weights is computed through each way's loss path: they must be equal.

Runs in an environment with the peers: ``pip install -e ".[peers]"``.

    python scripts/peers_training.py --steps 12 --repeats 3 --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

P, K = 8, 4
IMAGE_SIZE = 128
LR = 1e-4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def demo_manifest(folder: Path) -> Path:
    from retrieval.datasets.demo import prepare_demo

    return prepare_demo(folder / "demo", num_labels=60, images_per_label=12, image_size=IMAGE_SIZE)


def overrides(manifest: Path, out: Path) -> list[str]:
    return [
        f"paths.output_dir={out}",
        f"paths.data_dir={out}/data",
        "logger=csv",
        "backbone=efficientnet_lite0",
        "data=manifest",
        f"data.manifest={manifest}",
        f"data.image_size={IMAGE_SIZE}",
        "data.num_workers=0",
        "loss=multi_similarity",
        "miner=multi_similarity",
        "optimizer=adamw",
        f"optimizer.lr={LR}",
        "scheduler=none",
        "model.embedder.embedding_dim=512",
        "model.embedder.pooling=gem",
        f"sampler.labels_per_batch={P}",
        f"sampler.samples_per_label={K}",
        "baseline_pretrained=false",
        "baseline_untrained=false",
        "+trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "+trainer.enable_checkpointing=false",
        "~callbacks",
        "+trainer.enable_progress_bar=false",
    ]


class StepClock:
    """Ends of steps, as ``time.perf_counter()``; the differences are step times."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return list(np.diff(self.ends[warmup:]))


def _components(manifest: Path, out: Path) -> dict[str, Any]:
    """The run's objects as ``python train.py`` builds them (model, data, loss, miner)."""
    from retrieval.tasks.config import compose_config
    from retrieval.tasks.train import build

    cfg = compose_config(overrides(manifest, out))
    return build(cfg) | {"cfg": cfg}


def _optimizer(embedder: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [
            {"params": embedder.backbone_parameters(), "lr": LR},
            {"params": embedder.head_parameters(), "lr": 10 * LR},
        ],
        weight_decay=1e-4,
    )


def run_ours(manifest: Path, out: Path, steps: int) -> StepClock:
    import lightning.pytorch as pl

    from retrieval.tasks.config import compose_config
    from retrieval.tasks.train import build

    clock = StepClock()

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.tick()

    cfg = compose_config([*overrides(manifest, out), f"+trainer.max_steps={steps}"])
    built = build(cfg)
    built["trainer"].callbacks.append(Clock())
    built["trainer"].fit(built["module"], datamodule=built["datamodule"])
    return clock


def run_plain(manifest: Path, out: Path, steps: int) -> StepClock:
    parts = _components(manifest, out)
    module, datamodule = parts["module"], parts["datamodule"]
    embedder, loss, miner = module.model, module.loss, module.miner
    optimizer = _optimizer(embedder)
    embedder.train()
    clock = StepClock()
    done = 0
    while done < steps:
        for batch in datamodule.train_dataloader():
            embeddings = embedder(batch["image"])
            value = loss(embeddings, batch["label"], miner(embeddings, batch["label"]))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            clock.tick()
            done += 1
            if done == steps:
                break
    return clock


class _Pairs(torch.utils.data.Dataset):
    """Our training dataset as (image, label) pairs (PML) or OML's dict keys."""

    def __init__(self, dataset: Any, oml: bool = False) -> None:
        self.dataset, self.oml = dataset, oml

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if self.oml:
            return {"input_tensors": item["image"], "labels": item["label"]}
        return item["image"], item["label"]


def run_pml(manifest: Path, out: Path, steps: int) -> StepClock:
    from pytorch_metric_learning import samplers, trainers

    parts = _components(manifest, out)
    module, datamodule = parts["module"], parts["datamodule"]
    embedder, loss, miner = module.model, module.loss, module.miner
    dataset = datamodule.train_set
    labels = np.asarray(dataset.labels)
    clock = StepClock()

    class Done(Exception):
        pass

    def end_of_iteration(trainer: Any) -> None:
        clock.tick()
        if len(clock.ends) >= steps:
            raise Done

    trainer = trainers.MetricLossOnly(
        models={"trunk": embedder, "embedder": torch.nn.Identity()},
        optimizers={"trunk_optimizer": _optimizer(embedder)},
        batch_size=P * K,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miner},
        dataset=_Pairs(dataset),
        sampler=samplers.MPerClassSampler(
            labels, m=K, batch_size=P * K, length_before_new_iter=10**6
        ),
        dataloader_num_workers=0,
        end_of_iteration_hook=end_of_iteration,
        data_device=torch.device("cpu"),
    )
    with contextlib.suppress(Done):  # the hook ends training after the steps wanted
        trainer.train(num_epochs=1)
    return clock


def run_oml(manifest: Path, out: Path, steps: int) -> StepClock:
    import pytorch_lightning as opl
    from oml.lightning.modules.extractor import ExtractorModule
    from oml.samplers.balance import BalanceSampler

    parts = _components(manifest, out)
    module, datamodule = parts["module"], parts["datamodule"]
    embedder, loss, miner = module.model, module.loss, module.miner
    dataset = datamodule.train_set

    class Extractor(torch.nn.Module):
        feat_dim = 512

        def __init__(self) -> None:
            super().__init__()
            self.embedder = embedder

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embedder(x)

        def extract(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward(x)

    class Criterion(torch.nn.Module):
        def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return loss(embeddings, labels, miner(embeddings, labels))

    extractor = Extractor()
    oml_module = ExtractorModule(
        extractor=extractor, criterion=Criterion(), optimizer=_optimizer(embedder)
    )
    sampler = BalanceSampler(list(dataset.labels), n_labels=P, n_instances=K)
    loader = torch.utils.data.DataLoader(_Pairs(dataset, oml=True), batch_sampler=sampler)
    clock = StepClock()

    class Clock(opl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.tick()

    trainer = opl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
        num_sanity_val_steps=0,
    )
    trainer.fit(oml_module, train_dataloaders=loader)
    return clock


RUNNERS: dict[str, Callable[[Path, Path, int], StepClock]] = {
    "ours": run_ours,
    "plain": run_plain,
    "pml": run_pml,
    "oml": run_oml,
}


def same_loss(manifest: Path, out: Path) -> dict[str, float]:
    """The loss of one fixed batch, same initial weights, through each way's loss path."""
    from retrieval.training.losses import compute_loss

    parts = _components(manifest, out)
    module, datamodule = parts["module"], parts["datamodule"]
    batch = next(iter(datamodule.train_dataloader()))
    embedder = copy.deepcopy(module.model).train()
    torch.manual_seed(0)
    with torch.no_grad():
        embeddings = embedder(batch["image"])
    labels = batch["label"]
    loss, miner = module.loss, module.miner
    return {
        "ours": float(compute_loss(loss, miner, embeddings, labels)),
        "plain / oml": float(loss(embeddings, labels, miner(embeddings, labels))),
        "pml": float(loss(embeddings, labels, miner(embeddings, labels))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # train.py keeps freed memory for reuse (retrieval.infra.hardware); the setting is
    # process-wide, so it is made first and holds for every way alike
    # (RETRIEVAL_KEEP_FREED_MEMORY=0: none)
    from retrieval.infra.hardware import keep_freed_memory

    args.kept_freed_memory = keep_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="peers_training_"))
    manifest = demo_manifest(work)
    losses = same_loss(manifest, work / "loss")
    log(f"loss of one batch: {losses}")
    times: dict[str, list[float]] = {name: [] for name in args.only}
    for repeat in range(args.repeats):
        order = args.only[repeat % len(args.only) :] + args.only[: repeat % len(args.only)]
        for name in order:
            torch.manual_seed(repeat)
            clock = RUNNERS[name](manifest, work / f"{name}-{repeat}", args.warmup + args.steps)
            spent = clock.step_times(args.warmup)
            times[name] += spent
            log(f"{name} round {repeat + 1}: {statistics.median(spent) * 1000:.0f} ms a step")
    report = describe(args, losses) + table(times)
    print("\n".join(report))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n")


def describe(args: argparse.Namespace, losses: dict[str, float]) -> list[str]:
    import platform

    from _machine import cpu_model

    return [
        f"## Training throughput beside the peers ({time.strftime('%Y-%m-%d')})",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}; load average "
        f"{os.getloadavg()[0]:.2f} at the end",
        f"- EfficientNet-Lite0 (ImageNet), GeM + 512-d head, frozen BatchNorm, {IMAGE_SIZE} px, "
        f"P x K = {P} x {K}, Multi-Similarity loss + miner, AdamW {LR:g} (head x10), data in the "
        f"main process; {args.warmup} warm-up steps, {args.steps} timed, {args.repeats} rounds "
        "taking turns",
        f"- the loss of one fixed batch through each way: {losses}",
        "- freed memory kept for reuse (retrieval.infra.hardware, as train.py does), "
        "for every way: "
        f"{'yes' if args.kept_freed_memory else 'no (RETRIEVAL_KEEP_FREED_MEMORY=0 or no glibc)'}",
        f"- `python scripts/peers_training.py --steps {args.steps} --repeats {args.repeats}`",
        "",
    ]


def table(times: dict[str, list[float]]) -> list[str]:
    median = {name: statistics.median(t) for name, t in times.items()}
    lines = ["| way | median ms a step | images/s | ours / this |", "|---|---|---|---|"]
    for name, value in median.items():
        ratio = (1 / median["ours"]) / (1 / value) if "ours" in median else float("nan")
        lines.append(f"| {name} | {value * 1000:.0f} | {P * K / value:.1f} | {ratio:.3f} |")
    return lines + [""]


if __name__ == "__main__":
    main()

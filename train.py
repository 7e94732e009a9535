"""Train an embedding: ``python train.py [backbone=resnet50] [loss=proxy_anchor] [data=cub200]``.

Resume a run with ``python train.py ckpt_path=RUN/checkpoints/last.ckpt [overrides]``: the run's
own config, the overrides on top (:mod:`retrieval.tasks.resume`)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from retrieval.tasks.preflight import check_command_line
from retrieval.tasks.runs import monitored_value, reported, run_task


def objective(cfg: DictConfig) -> float:
    """Train; return the monitored metric's best value, what hyperparameter sweeps optimise."""
    from retrieval.tasks.resume import resumed_config

    cfg = resumed_config(cfg)  # a resume goes on with the run's own config
    from retrieval.tasks.train import train  # torch and Lightning load after these checks

    metrics, _ = train(cfg)
    return monitored_value(metrics, cfg.monitor)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from retrieval.infra.progress import console_copy, first_process

    # RUN/train.log holds what the console shows (the first process of a distributed run).
    # In a multirun a failed job writes error.txt in its run directory, returns None (Optuna:
    # a failed trial) and the sweep goes on; a single run raises.
    with console_copy(Path(cfg.paths.output_dir) / "train.log", enabled=first_process()):
        return run_task(reported(objective), cfg)


if __name__ == "__main__":
    check_command_line("train")  # one line for a typo or a missing value, not a traceback
    main()

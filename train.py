"""Train an embedding: ``python train.py [backbone=resnet50] [loss=proxy_anchor] [data=cub200]``."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.preflight import check_command_line
from retrieval.tasks.runs import monitored_value, reported, run_task
from retrieval.tasks.train import train


def objective(cfg: DictConfig) -> float:
    """Train; return the monitored metric's best value, what hyperparameter sweeps optimise."""
    metrics, _ = train(cfg)
    return monitored_value(metrics, cfg.monitor)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # In a multirun a failed job writes error.txt in its run directory, returns None (Optuna:
    # a failed trial) and the sweep goes on; a single run raises.
    return run_task(reported(objective), cfg)


if __name__ == "__main__":
    check_command_line("train")  # one line for a typo or a missing value, not a traceback
    main()

"""Train an embedding: ``python train.py [backbone=resnet50] [loss=proxy_anchor] [data=cub200]``."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    value = metrics.get(cfg.monitor)  # what hyperparameter sweeps optimise
    return None if value is None else float(value)


if __name__ == "__main__":
    main()

"""Export a search bundle:
``python export.py ckpt_path=RUN/checkpoints/best.ckpt [gallery=DIR | shards=DIR]``."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.export import export
from retrieval.tasks.runs import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_task(export, cfg)  # -m: a failed job writes error.txt and the sweep goes on


if __name__ == "__main__":
    main()

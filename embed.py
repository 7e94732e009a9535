"""Embed a folder or a manifest into resumable shards, split across workers:
``python embed.py images=DIR out_dir=SHARDS [ckpt_path=RUN/checkpoints/best.ckpt]``."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.embed import embed


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    embed(cfg)


if __name__ == "__main__":
    main()

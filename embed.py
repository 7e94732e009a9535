"""Embed a folder or a manifest into resumable shards, split across workers:
``python embed.py images=DIR out_dir=SHARDS [ckpt_path=RUN/checkpoints/best.ckpt]``."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.preflight import check_command_line
from retrieval.tasks.runs import reported, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    from retrieval.tasks.embed import embed  # torch loads after the preflight

    run_task(reported(embed), cfg)  # -m: a failed job writes error.txt and the sweep goes on


if __name__ == "__main__":
    check_command_line("embed")  # one line for a typo or a missing value, not a traceback
    main()

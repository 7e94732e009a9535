"""Export a search bundle:
``python export.py ckpt_path=RUN/checkpoints/best.ckpt [gallery=DIR | shards=DIR]``."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.preflight import check_command_line
from retrieval.tasks.runs import reported, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from retrieval.tasks.export import export  # torch loads after the preflight

    run_task(reported(export), cfg)  # -m: a failed job writes error.txt and the sweep goes on


if __name__ == "__main__":
    check_command_line("export")  # one line for a typo or a missing value, not a traceback
    main()

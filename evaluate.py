"""Evaluate: ``python evaluate.py ckpt_path=RUN/checkpoints/best.ckpt`` (a trained model),
``python evaluate.py backbone=resnet50 data=cub200`` (a backbone as-is) or
``python evaluate.py embeddings=FILE.npz`` (precomputed vectors)."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.preflight import check_command_line
from retrieval.tasks.runs import reported, run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    from retrieval.tasks.evaluate import evaluate  # torch loads after the preflight

    # -m: a failed job -> error.txt
    metrics, _ = run_task(reported(evaluate), cfg, failed=({}, None))
    value = metrics.get(f"{cfg.split}/recall@1")
    return None if value is None else float(value)


if __name__ == "__main__":
    check_command_line("evaluate")  # one line for a typo or a missing value, not a traceback
    main()

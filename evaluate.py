"""Evaluate: ``python evaluate.py ckpt_path=RUN/checkpoints/best.ckpt`` (a trained model),
``python evaluate.py backbone=resnet50 data=cub200`` (a backbone as-is) or
``python evaluate.py embeddings=FILE.npz`` (precomputed vectors)."""

import hydra
from omegaconf import DictConfig

from retrieval.tasks.evaluate import evaluate
from retrieval.tasks.runs import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = run_task(evaluate, cfg, failed=({}, None))  # -m: a failed job -> error.txt
    value = metrics.get(f"{cfg.split}/recall@1")
    return None if value is None else float(value)


if __name__ == "__main__":
    main()

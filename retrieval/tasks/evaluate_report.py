"""The report of ``evaluate``: metrics.json, per-label CSV, the results picture, the printed
table, and the same sent to the configured loggers (Weights & Biases, CSV)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from retrieval.evaluation import RetrievalResult
from retrieval.evaluation.reports import (
    choose_queries,
    per_label_table,
    results_grid,
    save_png,
    text_table,
    write_csv,
)
from retrieval.infra.io import atomic_write
from retrieval.training.loggers import describe_wandb, finish_wandb


@dataclass
class EvalInputs:
    """What gets scored, with what the report needs to show it."""

    result: RetrievalResult
    query_labels: np.ndarray  # (nq,) label names of the whole query set
    gallery_labels: np.ndarray  # (ng,)
    query_paths: np.ndarray | None  # (nq,) image paths, when known
    gallery_paths: np.ndarray | None
    ks: list[int]
    protocol: dict[str, Any] = field(default_factory=dict)
    # with postprocess steps: one row per cumulative set of steps, "none" first (the result
    # above is the last row's)
    ablation: list[dict[str, Any]] = field(default_factory=list)


def _table(metrics: dict[str, float], exact: dict[str, float] | None, index: dict[str, Any]) -> str:
    """Metrics one per line; with an approximate index, exact search beside it."""
    if exact is None:
        header, rows = ["metric", "value"], [[name, value] for name, value in metrics.items()]
    else:
        header = ["metric", index["factory"][:12], "exact"]
        rows = [[name, value, exact.get(name, float("nan"))] for name, value in metrics.items()]
    pad = [""] * (len(header) - 2)
    rows += [["index " + n, v, *pad] for n, v in index.items() if n.startswith("knn_recall@")]
    rows.append(["bytes per vector", f"{index['bytes_per_vector']:.1f}", *pad])
    return text_table(header, rows)


def _setups_table(metrics: dict[str, float]) -> str:
    """Revisited Oxford/Paris: one row per setup (E, M, H), mAP and mP@k x 100 as the papers
    print them (rules in retrieval/evaluation/revisited.py)."""
    ks = sorted({int(n.rsplit("@", 1)[1]) for n in metrics if n.startswith("mp_")})
    rows = [
        [
            setup[0].upper(),
            *(
                100 * metrics[f"{m}_{setup}{at}"]
                for m, at in [("map", "")] + [("mp", f"@{k}") for k in ks]
            ),
        ]
        for setup in ("easy", "medium", "hard")
        if f"map_{setup}" in metrics
    ]
    return text_table(["setup", "mAP", *(f"mP@{k}" for k in ks)], rows, decimals=2)


def _ablation_table(rows: list[dict[str, Any]]) -> str:
    """Each metric with no steps and with the steps added one at a time, side by side, and
    the extra milliseconds per query of each column."""
    names = [row["steps"] for row in rows]
    labels = [names[0]] + ["+" + n.rsplit("+", 1)[-1] for n in names[1:]]
    lines = [
        [m, *(row["metrics"].get(m, float("nan")) for row in rows)] for m in rows[0]["metrics"]
    ]
    lines.append(["extra ms / query", *(f"{row['extra_ms_per_query']:.3f}" for row in rows)])
    return text_table(["metric", *labels], lines)


def _picture(inputs: EvalInputs, cfg: DictConfig, path: Path) -> bool:
    """Draw N queries with their first results; False when the images are unknown."""
    result = inputs.result
    if inputs.query_paths is None or inputs.gallery_paths is None:
        return False
    if result.neighbor_ids is None or result.neighbor_scores is None or result.query_rows is None:
        return False
    ids = result.neighbor_ids
    hits = None
    if ids.shape[1]:
        first = np.where(ids[:, 0] >= 0, inputs.gallery_labels[np.clip(ids[:, 0], 0, None)], None)
        hits = first == inputs.query_labels[result.query_rows]
    chosen = choose_queries(int(cfg.report.num_queries), result.num_queries, int(cfg.seed), hits)
    rows, found = result.query_rows[chosen], ids[chosen]
    safe = np.clip(found, 0, None)
    image = results_grid(
        inputs.query_paths[rows],
        inputs.query_labels[rows],
        np.where(found >= 0, inputs.gallery_paths[safe], ""),
        np.where(found >= 0, inputs.gallery_labels[safe], "-"),
        result.neighbor_scores[chosen],
        thumb_size=int(cfg.report.thumb_size),
    )
    save_png(image, path)
    return True


def _query_table(inputs: EvalInputs, limit: int) -> tuple[list[str], list[list[Any]]]:
    """Per-query rows (worst first by the first metric), for a W&B table."""
    result = inputs.result
    assert result.query_rows is not None and result.neighbor_ids is not None
    names = list(result.per_query)
    order = np.lexsort([result.per_query[n] for n in reversed(names)])[:limit]
    columns = ["query", "label", "first results", *names]
    data = []
    for i in order:
        row = result.query_rows[i]
        found = [
            str(inputs.gallery_labels[j]) if j >= 0 else "-" for j in result.neighbor_ids[i][:5]
        ]
        path = inputs.query_paths[row] if inputs.query_paths is not None else str(row)
        values = [float(result.per_query[n][i]) for n in names]
        data.append([str(path), str(inputs.query_labels[row]), " ".join(found), *values])
    return columns, data


def _log(
    loggers: list[Any],
    metrics: dict[str, float],
    picture: Path | None,
    inputs: EvalInputs,
    cfg: DictConfig,
) -> list[str]:
    lines = []
    for logger in loggers:
        logger.log_metrics(metrics)
        if logger.__class__.__name__ == "WandbLogger":
            if picture is not None:
                logger.log_image(key="results", images=[str(picture)])
            columns, data = _query_table(inputs, int(cfg.report.table_rows))
            logger.log_table(key="queries", columns=columns, data=data)
            if inputs.ablation:
                names = list(inputs.ablation[0]["metrics"])
                logger.log_table(
                    key="postprocess",
                    columns=["steps", *names, "extra_ms_per_query"],
                    data=[
                        [
                            row["steps"],
                            *(row["metrics"][n] for n in names),
                            row["extra_ms_per_query"],
                        ]
                        for row in inputs.ablation
                    ],
                )
            lines.append(describe_wandb(logger))
        logger.save()
        if hasattr(logger, "finalize"):
            logger.finalize("success")
        if logger.__class__.__name__ == "WandbLogger":
            finish_wandb(logger)
    return lines


def write_report(
    inputs: EvalInputs, cfg: DictConfig, output_dir: Path, loggers: list[Any]
) -> dict[str, Any]:
    """Write and print the report; return the metrics named ``{split}/{name}``."""
    result = inputs.result
    split = cfg.split
    metrics: dict[str, Any] = {f"{split}/{k}": v for k, v in result.metrics.items()}
    counts = {"queries": result.num_queries, "excluded_queries": result.num_excluded}

    assert result.query_rows is not None
    label_rows = per_label_table(inputs.query_labels[result.query_rows], result.per_query)
    write_csv(label_rows, output_dir / "per_label.csv")
    picture: Path | None = output_dir / "results.png"
    assert picture is not None
    if not _picture(inputs, cfg, picture):
        picture = None

    payload = {
        "metrics": metrics,
        "exact_metrics": (
            {f"{split}/{k}": v for k, v in result.exact_metrics.items()}
            if result.exact_metrics is not None
            else None
        ),
        "index": result.index,
        **counts,
        "protocol": inputs.protocol,
        "postprocess_ablation": inputs.ablation or None,
        "files": {
            "per_label": "per_label.csv",
            "picture": picture.name if picture else None,
        },
    }
    with atomic_write(output_dir / "metrics.json", "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")

    lines = [_table(result.metrics, result.exact_metrics, result.index)]
    if "map_medium" in result.metrics:
        lines = [_setups_table(result.metrics)]
    if inputs.ablation:
        lines.append("search-time steps, added one at a time (postprocess=):")
        lines.append(_ablation_table(inputs.ablation))
    lines.append(
        f"{result.num_queries} queries scored, {result.num_excluded} without a relevant "
        f"gallery item left out ({inputs.protocol['data']['protocol']})"
    )
    if label_rows:
        worst = label_rows[0]
        lines.append(f"worst label: {worst['label']} (see per_label.csv)")
    lines += _log(
        loggers, {**metrics, **{f"{split}/{k}": v for k, v in counts.items()}}, picture, inputs, cfg
    )
    lines.append(f"report: {output_dir}")
    print("\n".join(lines), flush=True)
    return {
        **metrics,
        **{f"{split}/{k}": v for k, v in counts.items()},
        "output_dir": str(output_dir),
    }

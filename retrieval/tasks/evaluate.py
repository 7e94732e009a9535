"""``evaluate(cfg)``: score a trained checkpoint, a pretrained backbone as-is, or a file of
precomputed embeddings, and write the report. Called by ``evaluate.py`` and by tests.

The report of ``evaluate``: metrics.json, per-label CSV, the results picture, the printed
table, and the same sent to the configured loggers (Weights & Biases, CSV).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval.evaluation import RetrievalResult, evaluate_embeddings, evaluate_protocol
from retrieval.evaluation.listed import evaluate_listed, listed_protocol
from retrieval.evaluation.npz import read_embeddings_npz, write_embeddings_npz
from retrieval.evaluation.reports import (
    choose_queries,
    per_label_table,
    results_grid,
    save_png,
    text_table,
    write_csv,
)
from retrieval.infra.io import atomic_write, package_versions, sha256_file
from retrieval.models.extract import Embeddings, ms_per_image
from retrieval.postprocess import FittedSteps, Postprocess
from retrieval.tasks.distractors import EmbeddingRun, distractors_of
from retrieval.tasks.embedding import TaskEmbedding, inference_precision
from retrieval.tasks.models import data_config, describe_model, load_model, model_preprocessing
from retrieval.tasks.postprocess import fit_steps, fitting_split, postprocess_config
from retrieval.training.loggers import describe_wandb, finish_wandb

log = logging.getLogger(__name__)


def _options(cfg: DictConfig, ks: list[int]) -> dict[str, Any]:
    return {
        "ks": ks,
        "metrics": list(cfg.metrics),
        "factory": cfg.index.factory,
        "search_params": cfg.index.search_params or "",
        "compare_exact": bool(cfg.index.compare_exact),
        "keep_neighbors": int(cfg.report.top_k),
        "chunk_size": int(cfg.chunk_size),
        "seed": int(cfg.seed),
    }


def _from_npz(cfg: DictConfig) -> EvalInputs:
    path = Path(cfg.embeddings)
    if cfg.get("distractors"):
        raise ValueError(
            f"+distractors needs the model to embed the distractors, but embeddings={path} are "
            "precomputed: evaluate the checkpoint (ckpt_path=) or the backbone instead"
        )
    data = read_embeddings_npz(path)
    ks = list(cfg.ks or [1, 2, 4, 8])
    steps = _precomputed_steps(cfg, path)

    def score(chosen: Postprocess) -> RetrievalResult:
        try:
            return evaluate_embeddings(
                data.query,
                data.query_labels,
                data.gallery,
                data.gallery_labels,
                **_options(cfg, ks),
                postprocess=chosen,
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    result, ablation = _ablation(steps, score, len(data.query), {})
    loo = data.gallery is None
    return EvalInputs(
        result=result,
        query_labels=data.query_labels,
        gallery_labels=data.query_labels if loo else data.gallery_labels,  # type: ignore[arg-type]
        query_paths=data.query_paths,
        gallery_paths=data.query_paths if loo else data.gallery_paths,
        ks=ks,
        ablation=ablation,
        protocol={
            "evaluated": "embeddings file",
            "embeddings_file": {"path": str(path.resolve()), "sha256": sha256_file(path)},
            "data": {
                "protocol": "leave-one-out" if loo else "query/gallery",
                "queries": len(data.query),
                "gallery": len(data.query if loo else data.gallery),  # type: ignore[arg-type]
                "labels": int(np.unique(data.query_labels).size),
                "dim": int(data.query.shape[1]),
            },
        },
    )


def _precomputed_steps(cfg: DictConfig, path: Path) -> Postprocess:
    """The search-time steps, refusing those that need the model or the training split."""
    steps = postprocess_config(cfg)
    if steps.tta is not None:
        raise ValueError(
            f"postprocess.tta needs the model, but embeddings={path} are precomputed: drop tta "
            "or evaluate the checkpoint (ckpt_path=)"
        )
    if steps.whiten is not None and steps.whiten.fit_on == "train":
        raise ValueError(
            f"postprocess.whiten.fit_on=train needs the training split, but embeddings={path} "
            "hold only the evaluated one: use postprocess.whiten.fit_on=gallery"
        )
    if steps.score_norm is not None:
        raise ValueError(
            f"postprocess.score_norm compares queries with the training split, but "
            f"embeddings={path} hold only the evaluated one: drop score_norm"
        )
    return steps


def _from_model(cfg: DictConfig) -> EvalInputs:
    model = load_model(cfg)
    datamodule = instantiate(data_config(cfg, model.checkpoint), _partial_=True)(
        preprocessing=model_preprocessing(model), seed=cfg.seed, val_split=cfg.split
    )
    dataset = datamodule.eval_set()
    paths = np.array([str(row.path) for row in dataset.rows])
    steps = postprocess_config(cfg)
    listed = listed_protocol(dataset.rows)
    distractors = distractors_of(cfg, listed, steps)  # checked before anything is embedded
    embed = TaskEmbedding.of(cfg, model, datamodule)
    embeddings, cache = embed.cached(model.embedder, dataset)
    tta_embedder, fitted = fit_steps(steps, model.embedder, fitting_split(cfg, datamodule), embed)
    ks = list(cfg.ks or datamodule.eval_ks)
    scorer = _ModelScorer(
        cfg,
        ks,
        dataset.label_names[embeddings.labels],
        embeddings,
        embed(tta_embedder, dataset) if steps.tta else embeddings,
        fitted,
        (model.embedder, embed.runner),
        tta_embedder,
        listed,
        distractors,
        dataset.rows,
        EmbeddingRun(
            datamodule.preprocessing,
            embed.device,
            embed.batch_size,
            embed.num_workers,
            inference_precision(cfg, embed.device),
            cfg.inference.runtime,
        ),
    )
    embed_ms: dict[str, float] = {}
    if steps.tta:
        plain_ms, tta_ms = ms_per_image([model.embedder, tta_embedder], dataset, embed.device)
        embed_ms = {"none": plain_ms, "tta": tta_ms}
    result, ablation = _ablation(steps, scorer, int(embeddings.is_query.sum()), embed_ms)
    q_rows, g_rows = scorer.q_rows, scorer.g_rows
    names = scorer.names
    if cfg.save_embeddings:
        out = Path(cfg.paths.output_dir) / "embeddings.npz"
        _save_embeddings(out, embeddings.vectors, names, paths, q_rows, g_rows)
    sizes = _split_sizes(listed, q_rows, g_rows, names, embeddings.is_query)
    protocol = _model_protocol(cfg, model, datamodule, embed, sizes, cache)
    if steps:
        protocol["postprocess"] = {"steps": steps.to_dict(), "fitted_on": fitted.fitted_on}
    gallery_labels, gallery_paths = names[g_rows], paths[g_rows]
    if distractors is not None:  # "revisited+R1M"; first results among them shown too
        protocol["data"]["protocol"] += f"+{distractors.name}"
        protocol["distractors"] = distractors.describe()
        result, gallery_labels, gallery_paths = distractors.with_neighbours(
            result, gallery_labels, gallery_paths
        )
    return EvalInputs(
        result, names[q_rows], gallery_labels, paths[q_rows], gallery_paths, ks, protocol, ablation
    )


@dataclass
class _ModelScorer:
    """Scores the evaluated split's embeddings with a choice of the search-time steps (one
    call per row of the ablation), remembering the query and gallery rows of the last."""

    cfg: DictConfig
    ks: list[int]
    names: np.ndarray
    plain: Embeddings
    stepped: Embeddings
    fitted: FittedSteps
    embedders: tuple[Any, Any]  # the model's embedder and the runner embedding with it
    tta_embedder: Any  # the model's embedder with the TTA of the steps
    listed: str | None
    distractors: Any
    rows: list[Any]
    run: EmbeddingRun
    q_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    g_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __call__(self, chosen: Postprocess) -> RetrievalResult:
        vectors = self.stepped.vectors if chosen.tta else self.plain.vectors
        fitted = self.fitted
        options = {
            **_options(self.cfg, self.ks),
            "postprocess": chosen,
            "whitening": fitted.whitening if chosen.whiten else None,
            "background": fitted.background if chosen.score_norm else None,
        }
        if self.distractors is not None:  # embedded by the same model as the gallery scored
            pair = (self.tta_embedder, self.tta_embedder) if chosen.tta else self.embedders
            options["distractors"] = self.distractors.blocks(*pair, self.run)
        if self.listed is not None:  # the benchmark lists each query's gallery items
            result, self.q_rows, self.g_rows = evaluate_listed(vectors, self.rows, **options)
        else:
            result, self.q_rows, self.g_rows = evaluate_protocol(
                vectors, self.names, self.plain.is_query, self.plain.is_gallery, **options
            )
        return result


def _model_protocol(
    cfg: DictConfig,
    model: Any,
    datamodule: Any,
    embed: TaskEmbedding,
    sizes: dict[str, Any],
    cache: Path | None,
) -> dict[str, Any]:
    """What the report says of the model, the data (``sizes``: :func:`_split_sizes`) and the
    device evaluated."""
    protocol = describe_model(model, embed.preprocessing)
    device = embed.device
    protocol["data"] = {
        "dataset": str(datamodule.manifest),
        "split": cfg.split,
        **sizes,
        "embedding_cache": str(cache) if cache else None,
    }
    protocol["evaluation_device"] = {
        "device": str(device),
        "precision": inference_precision(cfg, device),
        "runtime": cfg.inference.runtime,
    }
    return protocol


def _split_sizes(
    listed: str | None,
    q_rows: np.ndarray,
    g_rows: np.ndarray,
    names: np.ndarray,
    is_query: np.ndarray,
) -> dict[str, Any]:
    """The protocol the split was scored with, its numbers of images and labels, and of
    queries and gallery items."""
    loo = len(q_rows) == len(g_rows) == len(names) and bool(is_query.all())
    return {
        "protocol": listed or ("leave-one-out" if loo else "query/gallery"),
        "images": len(names),
        "labels": int(np.unique(names).size),
        "queries": len(q_rows),
        "gallery": len(g_rows),
    }


def _ablation(
    steps: Postprocess,
    score: Any,
    num_queries: int,
    embed_ms: dict[str, float],
) -> tuple[RetrievalResult, list[dict[str, Any]]]:
    """Score with no steps, then with the steps added one at a time in their order; returns
    the last result and one row per set of steps: metrics, and the extra milliseconds per
    query they cost (search-side steps timed over the whole evaluation; TTA as the model's
    extra time per image)."""
    rows: list[dict[str, Any]] = []
    chosen = [Postprocess()] + [steps.up_to(name) for name in steps.steps]
    result = None
    base_seconds = 0.0
    for number, option in enumerate(chosen):
        start = time.perf_counter()
        result = score(option)
        seconds = time.perf_counter() - start
        if number == 0:
            base_seconds = seconds
        extra = max(0.0, seconds - base_seconds) * 1000.0 / max(1, num_queries)
        if option.tta and embed_ms:
            extra += embed_ms["tta"] - embed_ms["none"]
        rows.append(
            {
                "steps": option.describe(),
                "metrics": dict(result.metrics),
                "extra_ms_per_query": round(extra, 4),
            }
        )
    assert result is not None
    return result, rows if steps else []


def _save_embeddings(
    path: Path,
    vectors: np.ndarray,
    labels: np.ndarray,
    paths: np.ndarray,
    q_rows: np.ndarray,
    g_rows: np.ndarray,
) -> None:
    """Write the embeddings in the public npz layout, so ``embeddings=`` can re-score them."""
    if len(q_rows) == len(g_rows) == len(vectors) and (q_rows == g_rows).all():
        write_embeddings_npz(path, embeddings=vectors, labels=labels, paths=paths)
    else:
        write_embeddings_npz(
            path,
            query=vectors[q_rows],
            query_labels=labels[q_rows],
            gallery=vectors[g_rows],
            gallery_labels=labels[g_rows],
            query_paths=paths[q_rows],
            gallery_paths=paths[g_rows],
        )


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate per ``cfg``; returns ``(metrics, objects)`` with metrics named
    ``{split}/{name}`` (``test/recall@1``...) and the report written to the run directory."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    inputs = _from_npz(cfg) if cfg.get("embeddings") else _from_model(cfg)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    inputs.protocol["evaluation"] = {
        "ks": inputs.ks,
        "metrics": list(cfg.metrics),
        "index": dict(inputs.result.index),
        "seed": int(cfg.seed),
    }
    inputs.protocol["versions"] = package_versions(
        ("retrieval", "torch", "timm", "faiss-cpu", "numpy", "pytorch-metric-learning")
    )
    inputs.protocol["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node]
    metrics = write_report(inputs, cfg, output_dir, loggers)
    return metrics, {"inputs": inputs, "loggers": loggers}


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
    print them (rules in retrieval/evaluation/listed.py)."""
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

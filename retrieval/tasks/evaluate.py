"""``evaluate(cfg)``: score a trained checkpoint, a pretrained backbone as-is, or a file of
precomputed embeddings, and write the report. Called by ``evaluate.py`` and by tests."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval.evaluation import RetrievalResult, evaluate_embeddings, evaluate_protocol
from retrieval.evaluation.listed import evaluate_listed, listed_protocol
from retrieval.evaluation.npz import read_embeddings_npz, write_embeddings_npz
from retrieval.infra.io import package_versions, sha256_file
from retrieval.models.extract import resolve_device
from retrieval.postprocess import Postprocess
from retrieval.tasks.common import (
    data_config,
    describe_model,
    embed_dataset,
    embed_rows,
    inference_embedder,
    inference_precision,
    load_model,
    model_preprocessing,
)
from retrieval.tasks.distractors import EmbeddingRun, distractors_of
from retrieval.tasks.evaluate_report import EvalInputs, write_report
from retrieval.tasks.postprocess import fit_steps, fitting_split, ms_per_image, postprocess_config

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


def _from_model(cfg: DictConfig) -> EvalInputs:
    model = load_model(cfg)
    datamodule = instantiate(data_config(cfg, model.checkpoint), _partial_=True)(
        preprocessing=model_preprocessing(model), seed=cfg.seed, val_split=cfg.split
    )
    dataset = datamodule.eval_set()
    paths = np.array([str(row.path) for row in dataset.rows])
    device = resolve_device(cfg.inference.device)
    steps = postprocess_config(cfg)
    listed = listed_protocol(dataset.rows)
    distractors = distractors_of(cfg, listed, steps)  # checked before anything is embedded
    runner = inference_embedder(cfg, model, datamodule.preprocessing, device)
    preprocessing = datamodule.preprocessing.to_dict()
    batch_size = int(cfg.inference.batch_size or datamodule.eval_batch_size)
    run = EmbeddingRun(
        datamodule.preprocessing,
        device,
        batch_size,
        datamodule.num_workers,
        inference_precision(cfg, device),
        cfg.inference.runtime,
    )
    embeddings, cache = embed_dataset(
        cfg,
        runner,
        dataset,
        {"paths": paths.tolist(), "labels": [r.label for r in dataset.rows], "pre": preprocessing},
        batch_size=batch_size,
        num_workers=datamodule.num_workers,
        device=device,
    )
    names = dataset.label_names[embeddings.labels]
    ks = list(cfg.ks or datamodule.eval_ks)

    def embed(embedder: Any, images: Any) -> Any:
        embedder = runner if embedder is model.embedder else embedder
        return embed_rows(
            cfg, embedder, images, preprocessing, batch_size, datamodule.num_workers, device
        )

    fitted = fit_steps(
        steps,
        model.embedder,
        fitting_split(cfg, datamodule),
        embed,
    )
    stepped = embed(fitted.embedder, dataset) if steps.tta else embeddings
    embed_ms: dict[str, float] = {}
    if steps.tta:
        plain_ms, tta_ms = ms_per_image([model.embedder, fitted.embedder], dataset, device)
        embed_ms = {"none": plain_ms, "tta": tta_ms}
    q_rows = g_rows = np.zeros(0, dtype=np.int64)

    def score(chosen: Postprocess) -> RetrievalResult:
        nonlocal q_rows, g_rows
        vectors = stepped.vectors if chosen.tta else embeddings.vectors
        options = {
            **_options(cfg, ks),
            "postprocess": chosen,
            "whitening": fitted.whitening if chosen.whiten else None,
            "background": fitted.background if chosen.score_norm else None,
        }
        if distractors is not None:  # embedded by the same model as the gallery just scored
            pair = (fitted.embedder, fitted.embedder) if chosen.tta else (model.embedder, runner)
            options["distractors"] = distractors.blocks(*pair, run)
        if listed is not None:  # the benchmark lists each query's gallery items
            result, q_rows, g_rows = evaluate_listed(vectors, dataset.rows, **options)
        else:
            result, q_rows, g_rows = evaluate_protocol(
                vectors, names, embeddings.is_query, embeddings.is_gallery, **options
            )
        return result

    result, ablation = _ablation(steps, score, int(embeddings.is_query.sum()), embed_ms)
    if cfg.save_embeddings:
        _save_embeddings(
            Path(cfg.paths.output_dir) / "embeddings.npz",
            embeddings.vectors,
            names,
            paths,
            q_rows,
            g_rows,
        )
    protocol = describe_model(model, preprocessing)
    loo = len(q_rows) == len(g_rows) == len(names) and bool(embeddings.is_query.all())
    protocol["data"] = {
        "dataset": str(datamodule.manifest),
        "split": cfg.split,
        "protocol": listed or ("leave-one-out" if loo else "query/gallery"),
        "images": len(names),
        "labels": int(np.unique(names).size),
        "queries": len(q_rows),
        "gallery": len(g_rows),
        "embedding_cache": str(cache) if cache else None,
    }
    precision = inference_precision(cfg, device)
    protocol["evaluation_device"] = {
        "device": str(device),
        "precision": precision,
        "runtime": cfg.inference.runtime,
    }
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

"""``export(cfg)``: write a search bundle for a trained checkpoint or a backbone as-is, over the
data split's gallery, a folder of images, or shards embedded by ``embed.py`` (streamed, not
re-embedded). Called by ``export.py`` and by tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval.bundle.format import read_manifest
from retrieval.bundle.gallery import Gallery, image_gallery, shard_gallery
from retrieval.bundle.model_config import model_architecture
from retrieval.bundle.writer import write_bundle_chunks
from retrieval.data.dataset import ImageDataset
from retrieval.data.images import find_unreadable, images_in_folder, report_unreadable
from retrieval.data.manifest import ManifestRow, folder_labels
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.transforms import eval_transform
from retrieval.evaluation import evaluate_protocol
from retrieval.index.shards import ShardError, ShardSet
from retrieval.models.extract import model_fingerprint
from retrieval.postprocess import FittedSteps, Postprocess, Whitening
from retrieval.tasks.embedding import TaskEmbedding
from retrieval.tasks.models import (
    LoadedModel,
    bundle_input,
    data_config,
    describe_model,
    embedder_arguments,
    load_model,
    model_preprocessing,
)
from retrieval.tasks.postprocess import fit_steps, fitting_split, postprocess_config
from retrieval.tasks.runs import point_latest

log = logging.getLogger(__name__)


def _folder_gallery(cfg: DictConfig, transform: Any) -> ImageDataset:
    """Every readable image under ``cfg.gallery``, labelled by its folder when asked."""
    root = Path(cfg.gallery)
    paths = images_in_folder(root, name=f"gallery={root}")
    bad = find_unreadable(paths)
    report_unreadable(bad, len(paths), strict=False, where=f"gallery {root}")
    paths = [p for p in paths if p not in {b.path for b in bad}]
    labels = folder_labels(paths, root, cfg.labels)
    rows = [ManifestRow(p, label or "", "gallery") for p, label in zip(paths, labels, strict=True)]
    return ImageDataset(rows, transform)


def _open_shards(cfg: DictConfig, model: LoadedModel, preprocessing: Preprocessing) -> ShardSet:
    """The shards ``embed.py`` wrote into ``cfg.shards``, checked to be finished, unchanged
    and embedded by this model and preprocessing.

    Raises:
        ShardError: unfinished or changed shards, or shards of another model / preprocessing.
    """
    shards = ShardSet.open(cfg.shards)
    if shards.header["model_fingerprint"] != model_fingerprint(model.embedder, preprocessing):
        raise ShardError(
            f"{cfg.shards} was embedded by another model or preprocessing (shards.json: "
            f"{shards.header['preprocessing']}, {shards.header['dim']}-d; this export: "
            f"{preprocessing.to_dict()}, {model.embedder.embedding_dim}-d): export with the "
            "ckpt_path / backbone / data.image_size / data.resize_mode the shards were embedded "
            "with, or embed again"
        )
    shards.verify()
    return shards


def _shard_gallery(
    cfg: DictConfig, shards: ShardSet | None, whitening: Whitening | None
) -> Gallery | None:
    """The gallery of ``shards`` (None without), ``cfg.chunk_rows`` vectors a chunk and a
    training sample of ``cfg.max_train``, whitened by the whitening fitted on the training
    split."""
    if shards is None:
        return None
    return shard_gallery(shards, int(cfg.chunk_rows), int(cfg.max_train), whitening)


def _metrics_data(
    cfg: DictConfig, manifest: str, images: int, gallery: dict[str, Any]
) -> dict[str, Any]:
    """What the manifest's metrics were measured on, and whether that is the bundle's own
    gallery (``note``: the words ``retrieval info`` and the export print)."""
    own = not cfg.get("gallery") and not cfg.get("shards")
    where = f"the {cfg.split} split of {manifest} ({images} images)"
    note = (
        f"measured on {where}, whose gallery images this bundle holds"
        if own
        else f"measured on {where}, not on this bundle's gallery {gallery['source']}"
    )
    return {
        "manifest": manifest,
        "split": str(cfg.split),
        "images": images,
        "bundle_gallery": own,
        "note": note,
    }


def _calibrate_duplicates(
    cfg: DictConfig, model: Any, bundle: Path, split: Any, whitening: Any
) -> str | None:
    """Calibrate ``retrieval duplicates``' threshold for the exported bundle on the scored
    split (``data=copydetect``: originals, their edited copies and distractors; ``split``'s
    embeddings, whitened as the bundle's) and store it in the bundle's manifest
    (``calibrate_duplicates``: ``auto`` when the data is ``data=copydetect``, ``true``, or
    ``false``). Returns the line export prints, None when not calibrated."""
    setting = cfg.get("calibrate_duplicates", "auto")
    data = data_config(cfg, model.checkpoint)
    target = OmegaConf.select(data, "manifest._target_")
    copies = target == "retrieval.datasets.copydetect.prepare_copydetect"
    if setting is False or (setting == "auto" and not copies):
        return None
    if setting not in ("auto", True):
        raise ValueError(f"calibrate_duplicates={setting!r}: choose auto, true or false")
    from retrieval.bundle.format import update_manifest
    from retrieval.search.duplicate_finder import calibration

    vectors = split.vectors if whitening is None else whitening.apply(split.vectors)
    where = f"{Path(str(OmegaConf.select(data, 'root') or 'data')).name} {cfg.split} split"
    found = calibration(vectors, split.labels.tolist(), where)
    update_manifest(bundle, duplicates=found)
    return (
        f"duplicate threshold {found['threshold']} (pair precision {found['precision']}, "
        f"recall {found['recall']} on {found['calibrated_on']})"
    )


def _check_gallery_options(cfg: DictConfig, steps: Postprocess) -> None:
    """One gallery source, and no step that shards (embedded without it) cannot follow."""
    if cfg.get("gallery") and cfg.get("shards"):
        raise ValueError("pass gallery=DIR or shards=DIR, not both")
    gallery_fit = steps.whiten is not None and steps.whiten.fit_on == "gallery"
    if cfg.get("shards") and (steps.tta or steps.dba or gallery_fit):
        raise ValueError(
            f"postprocess steps {steps.steps} change the gallery's vectors in ways shards="
            f"{cfg.shards}, embedded without them, cannot follow (tta, dba, whitening fitted on "
            "the gallery): export from the images (drop shards=), or keep a whitening fitted on "
            "the training split and the query-time steps"
        )


def _summary(
    bundle: Path, dim: int, duplicates: str | None, metrics: dict[str, float], note: str
) -> str:
    """What the export prints: the bundle, its figures and the next commands."""
    lines = [f"bundle: {bundle}", f"items: {read_manifest(bundle)['items']}, dim {dim}"]
    if duplicates is not None:
        lines.append(duplicates)
    lines.append(f"metrics {note}:")
    lines += [f"  {name:<20}{value:.4f}" for name, value in metrics.items()]
    lines += ["next: search it, or serve it to search from a browser:"]
    lines += [f"  retrieval search {bundle} IMAGE.jpg", f"  retrieval serve {bundle}"]
    return "\n".join(lines)


def _write(
    cfg: DictConfig,
    model: LoadedModel,
    preprocessing: Preprocessing,
    gallery: Gallery,
    fitted: FittedSteps,
    description: dict[str, Any],
) -> Path:
    """The bundle of ``model`` with the fitted search-time steps over ``gallery``."""
    exported = model.embedder.with_search_steps(fitted.steps.tta, fitted.whitening)
    background = fitted.background
    if background is not None and fitted.whitening is not None:
        background = fitted.whitening.apply(background)  # the bundle's searched space
    return write_bundle_chunks(
        Path(cfg.bundle),
        exported,
        model_architecture(embedder_arguments(model)),
        preprocessing,
        gallery.chunks,
        gallery.dim,
        train_vectors=gallery.train_vectors,
        max_train=int(cfg.max_train),
        factory=cfg.index.factory,
        search_params=cfg.index.search_params or "",
        description=description,
        overwrite=bool(cfg.overwrite),
        background=background,
    )


def _description(
    cfg: DictConfig,
    model: LoadedModel,
    preprocessing: dict[str, Any],
    manifest: str,
    gallery: Gallery,
    fitted: FittedSteps,
    metrics: dict[str, float],
    measured_on: dict[str, Any],
) -> dict[str, Any]:
    """What the bundle's manifest says of how it was made and measured."""
    protocol = describe_model(model, preprocessing)
    protocol["data"] = {"dataset": manifest, "split": cfg.split}
    description: dict[str, Any] = {
        "metrics": metrics,
        "metrics_measured_on": measured_on,
        "protocol": protocol,
        "gallery": gallery.description,
    }
    if fitted.steps:
        steps = fitted.steps.to_dict()
        description["postprocess"] = {"steps": steps, "fitted_on": fitted.fitted_on}
    return description


def export(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export per ``cfg``; returns ``({"bundle": path, metrics...}, objects)``."""
    model = load_model(cfg)
    datamodule = instantiate(data_config(cfg, model.checkpoint), _partial_=True)(
        preprocessing=model_preprocessing(model),
        seed=cfg.seed,
        val_split=cfg.split,
        **bundle_input(cfg, model),
    )
    preprocessing = datamodule.preprocessing
    steps = postprocess_config(cfg)
    _check_gallery_options(cfg, steps)
    shards = _open_shards(cfg, model, preprocessing) if cfg.get("shards") else None
    embed_with = TaskEmbedding.of(cfg, model, datamodule)
    tta_embedder, fitted = fit_steps(
        steps, model.embedder, fitting_split(cfg, datamodule), embed_with
    )
    from_shards = _shard_gallery(cfg, shards, fitted.whitening)
    split = datamodule.eval_set()
    split_embeddings = embed_with(tta_embedder, split)
    names = split.label_names[split_embeddings.labels]
    result, _, gallery_rows = evaluate_protocol(
        split_embeddings.vectors,
        names,
        split_embeddings.is_query,
        split_embeddings.is_gallery,
        ks=list(cfg.ks or datamodule.eval_ks),
        metrics=list(cfg.metrics),
        postprocess=steps,
        whitening=fitted.whitening,
        background=fitted.background,
    )
    if from_shards is not None:
        gallery = from_shards
    else:
        if cfg.get("gallery"):
            dataset = _folder_gallery(cfg, eval_transform(preprocessing))
            source, rows = str(cfg.gallery), dataset.rows
            vectors = embed_with(tta_embedder, dataset).vectors
        else:
            source = f"{datamodule.manifest}:{cfg.split}"
            rows = [split.rows[i] for i in gallery_rows]
            vectors = split_embeddings.vectors[gallery_rows]
        # the whitening fitted on this gallery with fit_on=gallery, then DBA
        whitening = fitted.gallery_whitening(vectors)
        gallery = image_gallery(source, rows, vectors, whitening, steps.dba)
    metrics = {f"{cfg.split}/{k}": v for k, v in result.metrics.items()}
    manifest = str(datamodule.manifest)
    measured_on = _metrics_data(cfg, manifest, len(split), gallery.description)
    pre = preprocessing.to_dict()
    description = _description(cfg, model, pre, manifest, gallery, fitted, metrics, measured_on)
    bundle = _write(cfg, model, preprocessing, gallery, fitted, description)
    duplicates = _calibrate_duplicates(cfg, model, bundle, split_embeddings, fitted.whitening)
    if Path(bundle).parent.resolve() == Path(cfg.paths.output_dir).resolve():
        point_latest(Path(bundle).parent)  # logs/export/runs/latest/bundle: the newest bundle
    print(_summary(bundle, gallery.dim, duplicates, metrics, measured_on["note"]), flush=True)
    return {"bundle": str(bundle), **metrics}, {"model": model, "items": gallery.items}

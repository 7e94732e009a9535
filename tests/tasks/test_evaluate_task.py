"""``evaluate(cfg)`` in its three modes: embeddings file, backbone as-is, trained checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.evaluation import evaluate_embeddings
from retrieval.tasks.config import compose_config
from retrieval.tasks.evaluate import evaluate
from retrieval.tasks.train import train
from retrieval.training.checkpoints import CheckpointError
from tests.tasks.test_train import fast_cfg

QUICK = ["logger=csv", "metrics=[recall,precision,map@k,map@r,r_precision,map]"]


def compose_eval(tmp_path: Path, *overrides: str):
    return compose_config(
        [
            f"paths.data_dir={tmp_path}/data",
            f"paths.output_dir={tmp_path}/out",
            f"paths.log_dir={tmp_path}/logs",
            *QUICK,
            *overrides,
        ],
        name="evaluate",
    )


def _clusters(seed: int, labels: int, per_label: int, dim: int = 16, noise: float = 0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((labels, dim))
    y = np.repeat(np.arange(labels), per_label)
    x = centres[y] + noise * rng.standard_normal((len(y), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _thumbs(folder: Path, labels: np.ndarray) -> np.ndarray:
    """One small image per label value, so the picture has something to show."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(labels):
        path = folder / f"{i}.png"
        shade = int(label) * 37 % 255
        Image.new("RGB", (40, 30), (shade, 255 - shade, 90)).save(path)
        paths.append(str(path))
    return np.array(paths)


def test_embeddings_file_leave_one_out_matches_the_library(tmp_path, capsys):
    x, y = _clusters(0, labels=12, per_label=5)
    y[:2] = [100, 101]  # two lone labels: excluded, and counted
    names = np.array([f"item-{v}" for v in y])
    np.savez(tmp_path / "emb.npz", embeddings=x, labels=names)
    metrics, _ = evaluate(compose_eval(tmp_path, f"embeddings={tmp_path}/emb.npz"))

    expected = evaluate_embeddings(x, names, metrics=QUICK_METRICS)
    out = tmp_path / "out"
    report = json.loads((out / "metrics.json").read_text())
    for name, value in expected.metrics.items():
        assert metrics[f"test/{name}"] == pytest.approx(value, abs=1e-12)
        assert report["metrics"][f"test/{name}"] == pytest.approx(value, abs=1e-12)
    assert 0 < metrics["test/map@r"] < 1
    assert report["excluded_queries"] == 2 and report["queries"] == len(x) - 2
    assert report["protocol"]["data"]["protocol"] == "leave-one-out"
    assert report["protocol"]["embeddings_file"]["sha256"]
    assert report["files"]["picture"] is None  # no image paths in the file
    with (out / "per_label.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["label"] for r in rows} == {f"item-{v}" for v in range(12)}
    worst = min(float(r["recall@1"]) for r in rows)
    assert float(rows[0]["recall@1"]) == worst
    printed = capsys.readouterr().out
    assert "recall@1" in printed and "left out" in printed and str(out) in printed


QUICK_METRICS = ["recall", "precision", "map@k", "map@r", "r_precision", "map"]


def test_embeddings_file_query_gallery_with_an_approximate_index(tmp_path):
    x, y = _clusters(1, labels=20, per_label=30, dim=32)
    q, g = x[::3], np.delete(x, np.s_[::3], axis=0)
    ql, gl = y[::3], np.delete(y, np.s_[::3])
    np.savez(
        tmp_path / "qg.npz",
        query=q,
        query_labels=ql,
        gallery=g,
        gallery_labels=gl,
        query_paths=_thumbs(tmp_path / "img", ql),
        gallery_paths=_thumbs(tmp_path / "img_g", gl),
    )
    cfg = compose_eval(
        tmp_path,
        f"embeddings={tmp_path}/qg.npz",
        "index=ivf_pq",
        "index.factory='IVF16,PQ8np'",
        "index.search_params='nprobe=2'",
    )
    metrics, _ = evaluate(cfg)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    exact = report["exact_metrics"]
    assert exact is not None and set(exact) == set(report["metrics"])
    assert report["index"]["factory"] == "IVF16,PQ8np"
    assert 0 < report["index"]["knn_recall@8"] < 1  # PQ8 over 32-d is lossy
    assert report["index"]["bytes_per_vector"] < 32 * 4
    # exact-search values are those of a Flat evaluation of the same file
    flat = evaluate_embeddings(q, ql, g, gl, metrics=QUICK_METRICS)
    for name, value in flat.metrics.items():
        assert exact[f"test/{name}"] == pytest.approx(value, abs=1e-12)
    picture = Image.open(tmp_path / "out" / "results.png")
    assert picture.width >= 9 * 128 and picture.height >= 8 * 128  # 8 queries, 8 results
    assert report["protocol"]["data"]["protocol"] == "query/gallery"


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"embeddings": np.ones((4, 3), np.float32)}, "expected"),
        ({"embeddings": np.ones((4, 3), np.float32), "labels": np.arange(3)}, "one entry per"),
        ({"query": np.ones((4, 3), np.float32), "query_labels": np.arange(4)}, "expected"),
        ({"embeddings": np.full((4, 3), np.nan, np.float32), "labels": np.arange(4)}, "NaN"),
        ({"embeddings": np.ones((4, 3), np.float32), "labels": np.arange(4)}, "no query has"),
    ],
)
def test_bad_embeddings_files_name_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        evaluate(compose_eval(tmp_path, f"embeddings={tmp_path}/bad.npz"))
    assert "bad.npz" in str(info.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_and_pickled_embeddings_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(compose_eval(tmp_path, f"embeddings={tmp_path}/none.npz"))
    np.savez(tmp_path / "obj.npz", embeddings=np.ones((2, 2)), labels=np.array([{}, {}]))
    with pytest.raises(ValueError, match="object arrays"):
        evaluate(compose_eval(tmp_path, f"embeddings={tmp_path}/obj.npz"))


def test_backbone_as_is_on_a_manifest_then_from_the_cache(small_demo, tmp_path, monkeypatch):
    overrides = [
        "data=manifest",
        f"data.manifest={small_demo}",
        "data.image_size=64",
        "data.num_workers=0",
        "save_embeddings=true",
    ]
    metrics, objects = evaluate(compose_eval(tmp_path, *overrides))
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    protocol = report["protocol"]
    assert protocol["evaluated"] == "pretrained backbone as-is"
    assert protocol["model"]["backbone"] == "tf_efficientnet_lite0"
    assert protocol["model"]["embedding_dim"] == 1280 and protocol["model"]["pooling"] == "avg"
    assert protocol["preprocessing"]["input_size"] == 64
    assert protocol["data"]["images"] == protocol["data"]["queries"] == 30 * 12
    # ImageNet features separate the procedural labels far better than chance (1/30)
    assert metrics["test/recall@1"] > 0.3
    assert Image.open(tmp_path / "out" / "results.png").height > 128

    # the same model and data again: embeddings come from the cache, metrics are identical
    import retrieval.tasks.embedding as embedding

    def no_embedding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(embedding, "embed_loader", no_embedding)
    again, _ = evaluate(compose_eval(tmp_path, *overrides, f"paths.output_dir={tmp_path}/out2"))
    assert again["test/map@r"] == metrics["test/map@r"]

    # and the saved embeddings file scores the same through the embeddings= mode
    rescored, _ = evaluate(
        compose_eval(
            tmp_path,
            f"embeddings={tmp_path}/out/embeddings.npz",
            f"paths.output_dir={tmp_path}/out3",
        )
    )
    assert rescored["test/recall@1"] == pytest.approx(metrics["test/recall@1"], abs=1e-12)


def test_resize_mode_is_in_the_protocol_and_the_cache_key(small_demo, tmp_path):
    data = ["data=manifest", f"data.manifest={small_demo}", "data.image_size=48"]
    data += ["data.num_workers=0", "data.max_labels=3"]
    caches: dict[str, str] = {}
    for mode in ("crop", "squash", "crop"):
        out = f"paths.output_dir={tmp_path}/out-{mode}"
        evaluate(compose_eval(tmp_path, *data, f"data.resize_mode={mode}", out))
        protocol = json.loads((tmp_path / f"out-{mode}" / "metrics.json").read_text())["protocol"]
        assert protocol["preprocessing"]["resize_mode"] == mode
        assert protocol["preprocessing"]["input_size"] == 48
        cache = caches.setdefault(mode, protocol["data"]["embedding_cache"])
        assert protocol["data"]["embedding_cache"] == cache  # crop again: the same entry
    assert caches["crop"] != caches["squash"]  # crop and squash embeddings never mix
    vectors = {}
    for mode, cache in caches.items():
        with np.load(cache) as stored:
            vectors[mode] = stored["vectors"]
    assert not np.allclose(vectors["crop"], vectors["squash"], atol=1e-3)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_an_exported_runtime_embeds_as_pytorch_does(small_demo, tmp_path, runtime, monkeypatch):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    data = ["data=manifest", f"data.manifest={small_demo}", "data.image_size=48"]
    data += ["data.num_workers=0", "data.max_labels=4"]
    vectors, protocols = {}, {}
    for kind in ("eager", runtime):
        out = f"paths.output_dir={tmp_path}/out-{kind}"
        evaluate(compose_eval(tmp_path, *data, f"inference.runtime={kind}", out))
        report = json.loads((tmp_path / f"out-{kind}" / "metrics.json").read_text())
        protocols[kind] = report["protocol"]
        with np.load(protocols[kind]["data"]["embedding_cache"]) as stored:
            vectors[kind] = stored["vectors"]
    assert protocols[runtime]["evaluation_device"]["runtime"] == runtime
    # a cache entry of its own, and the same vectors to float32 rounding
    assert (
        protocols[runtime]["data"]["embedding_cache"]
        != protocols["eager"]["data"]["embedding_cache"]
    )
    cosine = (vectors[runtime] * vectors["eager"]).sum(axis=1)
    assert vectors[runtime].shape == vectors["eager"].shape and cosine.min() > 0.9999

    # scored again from the cache: nothing is exported
    import retrieval.bundle.model_export as model_export

    def no_export(*args, **kwargs):
        raise AssertionError("the cache should have been used, not an exported model")

    monkeypatch.setattr(model_export, "export_model", no_export)
    out = f"paths.output_dir={tmp_path}/again"
    evaluate(compose_eval(tmp_path, *data, f"inference.runtime={runtime}", out))
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["protocol"]
    assert again["data"]["embedding_cache"] == protocols[runtime]["data"]["embedding_cache"]


def test_an_exported_runtime_refuses_tta_and_half_precision(tmp_path):
    with pytest.raises(ValueError, match="use inference.runtime=eager with tta"):
        evaluate(compose_eval(tmp_path, "inference.runtime=onnx", "postprocess=[tta]"))
    with pytest.raises(ValueError, match="inference.runtime=onnx computes in float32"):
        evaluate(compose_eval(tmp_path, "inference.runtime=onnx", "inference.precision=bf16"))


@pytest.mark.slow
def test_checkpoint_scores_what_training_validation_logged(small_demo, tmp_path):
    run_cfg = fast_cfg(
        small_demo, tmp_path / "train", "trainer.max_epochs=1", "+trainer.limit_train_batches=4"
    )
    trained, _ = train(run_cfg)
    ckpt = Path(run_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    metrics, _ = evaluate(compose_eval(tmp_path, f"ckpt_path={ckpt}", "ks=[1,2,4,8]"))
    # validation during training and evaluate.py run the same code on the same split
    for name in ("recall@1", "recall@8", "map@r", "r_precision"):
        assert metrics[f"test/{name}"] == pytest.approx(trained[f"val/{name}"], abs=1e-6)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    protocol = report["protocol"]
    assert protocol["evaluated"] == "checkpoint"
    assert protocol["model"]["embedding_dim"] == 64
    assert protocol["training"]["sampler"] == {"labels_per_batch": 5, "samples_per_label": 4}
    assert len(protocol["checkpoint"]["sha256"]) == 64

    # a checkpoint whose weights do not fit its config is refused, naming the parameter
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["run_config"]["model"]["embedder"]["embedding_dim"] = 32
    torch.save(data, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="does not fit.*head"):
        evaluate(compose_eval(tmp_path, f"ckpt_path={tmp_path}/other.ckpt"))
    del data["run_config"]
    torch.save(data, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="no run config"):
        evaluate(compose_eval(tmp_path, f"ckpt_path={tmp_path}/bare.ckpt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(compose_eval(tmp_path, f"ckpt_path={tmp_path}/missing.ckpt"))


def test_data_defaults_to_the_demo_without_a_checkpoint(tmp_path):
    from retrieval.tasks.models import data_config

    cfg = compose_eval(tmp_path)
    node = data_config(cfg, None)
    assert node._target_.endswith("RetrievalDataModule")
    assert node.root == f"{tmp_path}/data/demo" and cfg.data.root == node.root
    given = compose_eval(tmp_path, "data=manifest", "data.manifest=/x.csv")
    assert data_config(given, None).manifest == "/x.csv"


def test_a_checkpoint_keeps_the_resize_mode_it_was_trained_with(small_demo):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from retrieval.data.datamodule import RetrievalDataModule
    from retrieval.data.preprocessing import Preprocessing
    from retrieval.tasks.embed import preprocessing_of
    from retrieval.tasks.models import model_preprocessing

    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def loaded(data):
        ckpt = None if data is None else SimpleNamespace(run_config={"data": data})
        return SimpleNamespace(embedder=SimpleNamespace(preprocessing=pre), checkpoint=ckpt)

    trained = loaded({"image_size": 32, "resize_mode": "squash"})
    assert model_preprocessing(loaded(None)) is pre
    assert model_preprocessing(trained) == pre.with_size(None, "squash")
    assert model_preprocessing(loaded({"image_size": 32})).resize_mode == "crop"  # older runs
    # evaluate / export: a data config's resize_mode=null keeps it, a value overrides it
    for override, expected in ((None, "squash"), ("pad", "pad")):
        dm = RetrievalDataModule(small_demo, model_preprocessing(trained), resize_mode=override)
        assert dm.preprocessing.resize_mode == expected
    # embed.py: the same, with the checkpoint's image size
    cfg = OmegaConf.create({"image_size": None, "resize_mode": None})
    assert preprocessing_of(cfg, trained) == pre.with_size(32, "squash")
    cfg.resize_mode = "crop"
    assert preprocessing_of(cfg, trained) == pre.with_size(32, "crop")


def test_report_goes_to_weights_and_biases_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    x, y = _clusters(2, labels=6, per_label=4)
    np.savez(tmp_path / "e.npz", embeddings=x, labels=y, paths=_thumbs(tmp_path / "img", y))
    evaluate(compose_eval(tmp_path, f"embeddings={tmp_path}/e.npz", "logger=default"))
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    assert list((media / "images").glob("*.png")), "the results picture was not logged"
    tables = list((media / "table").glob("*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["query", "label", "first results"]
    assert len(table["data"]) == len(x)
    assert "wandb sync" in capsys.readouterr().out


def test_an_image_rewritten_under_the_same_path_is_embedded_again(tmp_path):
    """Regenerated files (e.g. new copy-detection queries) must not be scored from stale
    cached embeddings of the old files at the same paths."""
    import csv as csv_module

    root = tmp_path / "imgs"
    rows = []
    for label in range(4):
        for index in range(3):
            path = root / f"{label}_{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (60 * label, 40 * index, 90)).save(path)
            rows.append((path.name, str(label), "test"))
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        csv_module.writer(handle).writerows([("path", "label", "split"), *rows])
    overrides = [
        "data=manifest",
        f"data.manifest={manifest}",
        "data.image_size=32",
        "data.num_workers=0",
        "metrics=[recall]",
        "ks=[1]",
    ]
    evaluate(compose_eval(tmp_path, *overrides))
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())["protocol"]
    Image.new("RGB", (40, 40), (255, 255, 0)).save(root / "0_0.png")  # same path, new pixels
    evaluate(compose_eval(tmp_path, *overrides, f"paths.output_dir={tmp_path}/out2"))
    second = json.loads((tmp_path / "out2" / "metrics.json").read_text())["protocol"]
    assert first["data"]["embedding_cache"] != second["data"]["embedding_cache"]


def test_postprocess_ablation_goes_to_weights_and_biases(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    x, y = _clusters(3, labels=6, per_label=4)
    np.savez(tmp_path / "e.npz", embeddings=x, labels=y)
    evaluate(
        compose_eval(
            tmp_path,
            f"embeddings={tmp_path}/e.npz",
            "logger=default",
            "postprocess=[whiten,aqe]",
            "postprocess.whiten.fit_on=gallery",
        )
    )
    (run,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    tables = [json.loads(p.read_text()) for p in (run / "files" / "media" / "table").glob("*.json")]
    (ablation,) = [t for t in tables if t["columns"][0] == "steps"]
    assert [row[0] for row in ablation["data"]] == ["none", "whiten", "whiten+aqe"]
    assert ablation["columns"][-1] == "extra_ms_per_query"


def test_the_precision_recorded_is_the_one_computed_in(tmp_path):
    from retrieval.tasks.embedding import inference_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    eager = compose_eval(tmp_path)
    assert inference_precision(eager, cuda) == "bf16" and inference_precision(eager, cpu) == "fp32"
    # an exported runtime computes in float32 whatever auto would pick for the device
    assert inference_precision(compose_eval(tmp_path, "inference.runtime=onnx"), cuda) == "fp32"

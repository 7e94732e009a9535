"""``export(cfg)``: a bundle from a backbone or a checkpoint, over a split or a folder; atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.bundle.format import BundleError, read_manifest, verify_files
from retrieval.search import Retriever
from retrieval.tasks.config import compose_config
from retrieval.tasks.export import export


def compose_export(tmp_path: Path, manifest: Path, *overrides: str):
    return compose_config(
        [
            f"paths.data_dir={tmp_path}/data",
            f"paths.output_dir={tmp_path}/out",
            f"paths.log_dir={tmp_path}/logs",
            "data=manifest",
            f"data.manifest={manifest}",
            "data.image_size=64",
            "data.num_workers=0",
            "image_size=64",  # a backbone as-is is exported at its own 224 px otherwise
            *overrides,
        ],
        name="export",
    )


def test_export_of_the_backbone_over_the_test_split(small_demo, tmp_path, capsys):
    metrics, _ = export(compose_export(tmp_path, small_demo))
    bundle = Path(metrics["bundle"])
    assert bundle == tmp_path / "out" / "bundle"
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)  # every immutable file matches its checksum
    assert set(manifest["files"]) == {
        "model.json",
        "model.safetensors",
        "model.ts",
        "model.onnx",
        "preprocessing.json",
    }
    assert manifest["items"] == 30 * 12 and manifest["embedding_dim"] == 1280
    assert manifest["index"] == {"factory": "Flat", "search_params": ""}
    assert manifest["metrics"]["test/recall@1"] == metrics["test/recall@1"] > 0.3
    assert manifest["protocol"]["model"]["backbone"] == "tf_efficientnet_lite0"
    assert json.loads((bundle / "preprocessing.json").read_text())["input_size"] == 64
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]
    out = capsys.readouterr().out
    assert "bundle:" in out
    assert manifest["metrics_measured_on"]["bundle_gallery"] is True
    assert "whose gallery images this bundle holds" in out
    assert f"  retrieval search {bundle} IMAGE.jpg" in out.splitlines()  # what to run next

    # the bundle answers: a gallery image finds itself
    with Retriever.load(bundle) as retriever:
        assert len(retriever) == 360
        hit = retriever.search([Path(retriever.items.store.get([1])[0].uri)], k=1)[0][0]
        assert hit.id == 1 and hit.score > 0.999

    # an existing bundle is kept unless overwrite=true
    with pytest.raises(BundleError, match="overwrite"):
        export(compose_export(tmp_path, small_demo))
    export(compose_export(tmp_path, small_demo, "overwrite=true", "index=hnsw"))
    assert read_manifest(bundle)["index"]["factory"] == "HNSW32"


def test_an_interrupted_export_leaves_nothing_that_loads(small_demo, tmp_path, monkeypatch):
    import retrieval.bundle.writer as writer

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer.IndexedItems, "create", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(compose_export(tmp_path, small_demo))
    out = tmp_path / "out"
    assert not (out / "bundle").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_of_a_folder_gallery_with_folder_labels(small_demo, tmp_path):
    gallery = tmp_path / "photos"
    for i, label in enumerate(["cats/a", "cats/a", "dogs", "dogs"]):
        (gallery / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (50, 40), (i * 60, 100, 200 - i * 40)).save(gallery / label / f"{i}.jpg")
    (gallery / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
    (gallery / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="1 of 5"):
        metrics, objects = export(compose_export(tmp_path, small_demo, f"gallery={gallery}"))
    labels = sorted(item.label for item in objects["items"])
    assert labels == ["cats/a", "cats/a", "dogs", "dogs"]
    manifest = read_manifest(metrics["bundle"])
    assert manifest["items"] == 4 and manifest["gallery"]["source"] == str(gallery)
    assert "test/recall@1" in manifest["metrics"]  # scored on the data split all the same
    measured = manifest["metrics_measured_on"]  # ... and labelled so
    assert measured["split"] == "test" and measured["bundle_gallery"] is False
    assert measured["note"].endswith(f"not on this bundle's gallery {gallery}")
    assert measured["images"] == 360 and measured["manifest"] in measured["note"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        export(compose_export(tmp_path, small_demo, f"gallery={empty}", "overwrite=true"))


@pytest.mark.slow
def test_export_of_a_checkpoint_matches_its_evaluation(small_demo, tmp_path):
    from retrieval.tasks.evaluate import evaluate
    from retrieval.tasks.train import train
    from tests.tasks.test_evaluate_task import compose_eval
    from tests.tasks.test_train import fast_cfg

    run = fast_cfg(
        small_demo,
        tmp_path / "train",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "model.embedder.frozen_stages=1",  # how it trained, not what it computes: not exported
    )
    train(run)
    ckpt = Path(run.paths.output_dir) / "checkpoints" / "last.ckpt"
    metrics, _ = export(compose_export(tmp_path, small_demo, f"ckpt_path={ckpt}", "postprocess=[]"))
    evaluated, _ = evaluate(compose_eval(tmp_path / "eval", f"ckpt_path={ckpt}"))
    assert metrics["test/recall@1"] == pytest.approx(evaluated["test/recall@1"], abs=1e-9)
    manifest = read_manifest(metrics["bundle"])
    assert manifest["embedding_dim"] == 64  # the trained head, not the backbone's features
    with Retriever.load(metrics["bundle"], runtime="onnx") as retriever:
        item = retriever.items.store.get([5])[0]
        vector = retriever.embed([item.uri])[0]
        assert float(np.dot(vector, item.vector)) > 0.9999  # ONNX == the PyTorch export


@pytest.mark.slow  # embeds the shards, then the split export scores: ~50 s on 2 cores
def test_export_from_shards_searches_like_the_models_own_embeddings(small_demo, tmp_path):
    import torch

    from retrieval.data.images import open_rgb as load_rgb
    from retrieval.data.transforms import eval_transform
    from retrieval.index.shards import ShardError
    from retrieval.tasks.embed import embed
    from tests.index.synthetic import brute_force
    from tests.tasks.test_embed_task import compose_embed, make_images

    paths = make_images(tmp_path / "photos", 12, size=80)
    shards = tmp_path / "shards"
    with pytest.warns(UserWarning, match="skipping 1"):
        _, objects = embed(
            compose_embed(
                tmp_path, f"images={tmp_path / 'photos'}", f"out_dir={shards}", "shard_size=5"
            )
        )
    # a different preprocessing than the shards were embedded with is refused before any work
    with pytest.raises(ShardError, match="another model or preprocessing"):
        export(compose_export(tmp_path, small_demo, f"shards={shards}", "image_size=96"))

    unwhitened = ("chunk_rows=4", "postprocess=[]")
    metrics, _ = export(compose_export(tmp_path, small_demo, f"shards={shards}", *unwhitened))
    manifest = read_manifest(metrics["bundle"])
    assert manifest["items"] == 12 and manifest["gallery"]["shards"] == str(shards.resolve())
    assert manifest["gallery"]["skipped_unreadable"] == 1
    assert "test/recall@1" in manifest["metrics"]

    model = objects["model"].embedder.eval()
    transform = eval_transform(model.preprocessing.with_size(64, "squash"))
    with torch.inference_mode():
        own = model(torch.stack([transform(load_rgb(p)) for p in paths])).numpy()
    _, expected = brute_force(own, own, 3)
    with Retriever.load(metrics["bundle"], runtime="eager") as retriever:
        stored = retriever.items.store.get(list(range(1, 13)))
        assert [item.uri for item in stored] == [str(p) for p in paths]
        np.testing.assert_allclose(np.stack([i.vector for i in stored]), own, atol=1e-5)
        hits = retriever.search(paths, k=3)
    assert [[h.uri for h in row] for row in hits] == [[str(paths[j]) for j in r] for r in expected]
    assert all(row[0].score > 0.999 for row in hits)


def test_a_squash_bundle_embeds_the_whole_image_like_the_pytorch_model(small_demo, tmp_path):
    import torch

    from retrieval.data.transforms import eval_transform

    overrides = ("resize_mode=squash", "data.max_labels=4", "postprocess=[]")
    metrics, objects = export(compose_export(tmp_path, small_demo, *overrides))
    bundle = Path(metrics["bundle"])
    stored = json.loads((bundle / "preprocessing.json").read_text())
    assert (stored["resize_mode"], stored["input_size"], stored["resize"]) == ("squash", 64, 64)
    protocol = read_manifest(bundle)["protocol"]
    assert protocol["preprocessing"]["resize_mode"] == "squash"

    model = objects["model"].embedder.eval()
    first = sorted((small_demo.parent / "images").rglob("*.jpg"))[0]
    wide = Image.open(first).convert("RGB").resize((150, 60))  # a letterbox-shaped copy
    own = {}
    for mode in ("squash", "crop"):
        pixels = eval_transform(model.preprocessing.with_size(64, mode))(wide)
        with torch.inference_mode():
            own[mode] = model(pixels[None]).numpy()[0]
    assert float(np.dot(own["squash"], own["crop"])) < 0.99  # the two modes see other pixels
    with Retriever.load(bundle, runtime="eager") as retriever:
        np.testing.assert_allclose(retriever.embed([wide])[0], own["squash"], atol=1e-5)
    with Retriever.load(bundle, runtime="onnx") as retriever:
        assert float(np.dot(retriever.embed([wide])[0], own["squash"])) > 0.9999


def test_the_default_export_sees_the_whole_image_at_the_backbones_size_and_whitens(
    small_demo, tmp_path
):
    """No options: GeM, the backbone's own 224 px (not data.image_size), squashed, and the
    whitening learned from edited copies of the training split (a layer of the model)."""
    cfg = compose_config(
        [
            f"paths.data_dir={tmp_path}/data",
            f"paths.output_dir={tmp_path}/out",
            "data=manifest",
            f"data.manifest={small_demo}",
            "data.image_size=64",
            "data.max_labels=3",
            "data.num_workers=0",
        ],
        name="export",
    )
    metrics, objects = export(cfg)
    bundle = Path(metrics["bundle"])
    stored = json.loads((bundle / "preprocessing.json").read_text())
    assert (stored["input_size"], stored["resize_mode"]) == (224, "squash")
    model = json.loads((bundle / "model.json").read_text())
    assert model["embedder"]["pooling"] == "gem" and model["embedder"]["whiten_dim"] == 1280
    fitted = read_manifest(bundle)["postprocess"]["fitted_on"]["whiten"]
    assert fitted["method"] == "edits" and fitted["images"] == 3 * 12
    first = sorted((small_demo.parent / "images").rglob("*.jpg"))[0]
    with (
        Retriever.load(bundle, runtime="onnx") as onnx,
        Retriever.load(bundle, runtime="eager", read_only=True) as eager,
    ):
        assert float(np.dot(onnx.embed([first])[0], eager.embed([first])[0])) > 0.9999


def test_the_whitening_fits_on_another_datas_training_split(small_demo, tmp_path):
    """``+data@fit_data=...``: the whitening of the bundle is fitted on that data's training
    split (2 labels of 12 images here), not on the indexed data's (3 labels)."""
    other = ["+data@fit_data=manifest", f"fit_data.manifest={small_demo}", "fit_data.max_labels=2"]
    metrics, _ = export(compose_export(tmp_path, small_demo, "data.max_labels=3", *other))
    fitted = read_manifest(Path(metrics["bundle"]))["postprocess"]["fitted_on"]["whiten"]
    assert fitted["method"] == "edits" and fitted["images"] == 2 * 12


def test_a_long_side_bundle_keeps_the_aspect_in_every_runtime(small_demo, tmp_path):
    """``resize_mode=long`` (the papers' longest side): a model for any size, whose ONNX file
    embeds a wide image as the PyTorch model does."""
    overrides = ("resize_mode=long", "data.max_labels=3", "postprocess=[]")
    metrics, _ = export(compose_export(tmp_path, small_demo, *overrides))
    bundle = Path(metrics["bundle"])
    stored = json.loads((bundle / "preprocessing.json").read_text())
    assert (stored["input_size"], stored["resize_mode"]) == (64, "long")
    assert json.loads((bundle / "model.json").read_text())["any_size"] is True
    wide = tmp_path / "wide.png"
    pixels = np.random.default_rng(0).integers(0, 256, (70, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(wide)
    with (
        Retriever.load(bundle, runtime="onnx") as onnx,
        Retriever.load(bundle, runtime="eager", read_only=True) as eager,
    ):
        assert onnx.preprocessing.prepare(wide).shape == (3, 37, 64)  # 70 x 120 -> 37 x 64
        assert float(np.dot(onnx.embed([wide])[0], eager.embed([wide])[0])) > 0.9999

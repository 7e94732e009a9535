"""A copy-detection bundle as a user scores it: export.py with the whitening learned from
edited copies and score normalisation, then ``retrieval score`` (Retriever.search on the
bundle's files) gives the R@1 and µAP that evaluate.py computes for the same model, data and
steps (within 1e-3). evaluate.py scores the backbone as-is with average pooling by default,
export.py with GeM: the evaluation here names GeM so both score one model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.bundle.format import BACKGROUND, read_manifest
from retrieval.search import Retriever
from retrieval.search.score import score_bundle
from retrieval.tasks.config import compose_config
from retrieval.tasks.evaluate import evaluate
from retrieval.tasks.export import export
from tests.datasets.test_copydetect import _benchmark

STEPS = "postprocess=[whiten_edits,score_norm]"


def _compose(name: str, tmp_path: Path, root: Path, *overrides: str):
    return compose_config(
        [
            f"paths.data_dir={tmp_path}/data",
            f"paths.output_dir={tmp_path}/out-{name}",
            "data=copydetect",
            f"data.root={root}",
            "data.image_size=64",
            "data.num_workers=0",
            "inference.use_cache=false",
            STEPS,
            *(["logger=csv", "embedder.pooling=gem"] if name == "evaluate" else ["image_size=64"]),
            *overrides,
        ],
        name=name,
    )


@pytest.mark.slow  # two embeddings of a small benchmark and an export: ~40 s on 2 cores
def test_score_through_the_bundle_equals_evaluate(tmp_path: Path) -> None:
    root = _benchmark(tmp_path / "bench", originals=13, distractors=30)
    metrics = "metrics=[recall,micro_ap]"
    evaluated, _ = evaluate(_compose("evaluate", tmp_path, root, metrics, "ks=[1,10]"))
    exported, _ = export(_compose("export", tmp_path, root, metrics, "ks=[1,10]"))
    bundle = Path(exported["bundle"])
    manifest = read_manifest(bundle)
    assert BACKGROUND in manifest["files"]  # the background is stored, checksummed
    assert manifest["postprocess"]["fitted_on"]["score_norm"]["background"] == 30
    assert json.loads((bundle / "model.json").read_text())["embedder"]["whiten_dim"] == 1280

    rows = [line.split(",") for line in (root / "manifest.csv").read_text().splitlines()[1:]]
    queries = [(root / r[0], r[1], r[5]) for r in rows if r[2] == "test" and r[3] == "1"]
    with Retriever.load(bundle, runtime="onnx") as retriever:  # what `retrieval score` runs
        assert retriever.background is not None and retriever.background.shape == (30, 1280)
        scored = score_bundle(retriever, queries, k=10)
    assert scored["recall@1"] == pytest.approx(evaluated["test/recall@1"], abs=1e-3)
    assert scored["micro_ap@10"] == pytest.approx(evaluated["test/micro_ap@10"], abs=1e-3)
    # the normalised scores are what the µAP ranks: a query's best score minus its
    # similarity to the nearest training image
    with Retriever.load(bundle, runtime="onnx", read_only=True) as retriever:
        vector = retriever.embed([queries[0][0]])
        hit = retriever.search(vector, k=1)[0][0]
        nearest = float((retriever.background @ vector[0]).max())
        raw = float(retriever.items.vectors([hit.id])[0] @ vector[0])
    assert hit.score == pytest.approx(raw - nearest, abs=1e-5)
    assert np.isfinite(hit.score)


def test_edited_copies_are_embedded_not_read_back_as_the_plain_images(tmp_path: Path) -> None:
    """The embedding cache keys an edited copy of a split apart from the split itself: the
    (image, edited copy) pairs that whiten_edits learns from must differ."""
    import torch

    from retrieval.data.dataset import EditedCopies, ImageDataset
    from retrieval.data.manifest import ManifestRow
    from retrieval.data.transforms import eval_transform
    from retrieval.models import Embedder, create_backbone
    from retrieval.tasks.embedding import embed_rows

    root = _benchmark(tmp_path / "bench", originals=4, distractors=4)
    paths = sorted((root / "distractors").glob("*.jpg"))
    rows = [ManifestRow(path=p, label=p.stem, split="train") for p in paths]
    embedder = Embedder(create_backbone("test_convnext", pretrained=False), None, "gem").eval()
    transform = eval_transform(embedder.preprocessing.with_size(32, "squash"))
    cfg = compose_config(
        [f"paths.output_dir={tmp_path}/out", f"inference.cache_dir={tmp_path}/cache"],
        name="evaluate",
    )

    def vectors(dataset: ImageDataset) -> np.ndarray:
        args = (embedder.preprocessing.to_dict(), 4, 0, torch.device("cpu"))
        return embed_rows(cfg, embedder, dataset, *args)[0].vectors

    plain = vectors(ImageDataset(rows, transform))
    edited = vectors(EditedCopies(rows, transform, max_side=64, seed=0))
    assert not np.allclose(plain, edited, atol=1e-4)
    np.testing.assert_array_equal(vectors(EditedCopies(rows, transform, 64, seed=0)), edited)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2

"""The search-time stage through evaluate, export, the Retriever and the service."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.bundle.format import read_manifest
from retrieval.bundle.runtime import load_runtime
from retrieval.evaluation import evaluate_embeddings
from retrieval.postprocess import (
    AQE,
    Postprocess,
    Rerank,
    database_augment,
    dba_vectors_for,
    search_with_steps,
)
from retrieval.search import Retriever
from retrieval.service import ServiceSettings, create_app
from retrieval.tasks.config import compose_config
from retrieval.tasks.evaluate import evaluate
from retrieval.tasks.export import export

STEPS = [
    "postprocess=[tta,whiten,dba,aqe]",
    "postprocess.tta.scales=[1.0,0.75]",
    "postprocess.whiten.dim=64",
]


def compose(name: str, tmp_path: Path, manifest: Path, *overrides: str):
    return compose_config(
        [
            f"paths.data_dir={tmp_path}/data",
            f"paths.output_dir={tmp_path}/out-{name}",
            f"paths.log_dir={tmp_path}/logs",
            "data=manifest",
            f"data.manifest={manifest}",
            "data.image_size=64",
            "data.resize_mode=squash",  # as export sees a backbone as-is: the whole image
            "data.num_workers=0",
            # evaluate.py pools as export.py does (conf/export.yaml: gem)
            *(["logger=csv", "embedder.pooling=gem"] if name == "evaluate" else ["image_size=64"]),
            *overrides,
        ],
        name=name,
    )


@pytest.fixture(scope="module")
def stepped(small_demo, tmp_path_factory):
    """One evaluation and one export of the backbone as-is with TTA, whitening (fitted on the
    training split), DBA and αQE, sharing one embedding cache."""
    tmp = tmp_path_factory.mktemp("steps")
    metrics, objects = evaluate(
        compose("evaluate", tmp, small_demo, "metrics=[recall,map@r,map]", *STEPS)
    )
    exported, _ = export(compose("export", tmp, small_demo, "metrics=[recall,map@r]", *STEPS))
    return tmp, metrics, objects["inputs"], Path(exported["bundle"]), exported


def test_evaluate_reports_each_step_added_and_the_final_metrics(stepped):
    tmp, metrics, inputs, _, _ = stepped
    rows = inputs.ablation
    assert [r["steps"] for r in rows] == [
        "none",
        "tta",
        "tta+whiten",
        "tta+whiten+dba",
        "tta+whiten+dba+aqe",
    ]
    assert rows[-1]["metrics"] == inputs.result.metrics
    assert metrics["test/recall@1"] == rows[-1]["metrics"]["recall@1"]
    assert all(r["extra_ms_per_query"] >= 0 for r in rows)
    assert rows[1]["extra_ms_per_query"] > 0  # two views cost more than one
    # each step changed something
    maps = [r["metrics"]["map@r"] for r in rows]
    assert len(set(maps)) == len(maps)
    report = json.loads((tmp / "out-evaluate" / "metrics.json").read_text())
    assert report["postprocess_ablation"] == json.loads(json.dumps(rows))
    fitted = report["protocol"]["postprocess"]["fitted_on"]["whiten"]
    assert fitted == {"split": "train", "images": 360, "method": "pca"}


def test_evaluate_none_column_is_the_plain_evaluation(stepped, small_demo):
    tmp, _, inputs, _, _ = stepped
    plain, _ = evaluate(compose("evaluate", tmp, small_demo, "metrics=[recall,map@r,map]"))
    assert {f"test/{k}": v for k, v in inputs.ablation[0]["metrics"].items()} == {
        k: v for k, v in plain.items() if k.startswith("test/") and "queries" not in k
    }


def test_export_stores_the_steps_and_every_runtime_computes_tta_and_whitening(stepped):
    _, evaluated, _, bundle, exported = stepped
    manifest = read_manifest(bundle)
    assert (
        manifest["postprocess"]["steps"]
        == Postprocess.from_dict(
            {
                "tta": {"scales": [1.0, 0.75], "flip": True},
                "whiten": {"dim": 64, "shrinkage": 0.1},
                "dba": {},
                "aqe": {},
            }
        ).to_dict()
    )
    assert manifest["embedding_dim"] == 64
    model = json.loads((bundle / "model.json").read_text())
    assert model["embedder"]["tta"] == {"scales": [1.0, 0.75], "flip": True}
    assert model["embedder"]["whiten_dim"] == 64
    # the bundle's own evaluation with the steps is the evaluation's
    assert exported["test/recall@1"] == evaluated["test/recall@1"]
    assert exported["test/map@r"] == evaluated["test/map@r"]
    with Retriever.load(bundle) as retriever:
        uris = [item.uri for item in retriever.items.store.get([1, 2, 3])]
        pixels = retriever.preprocessing.batch([Image.open(u).convert("RGB") for u in uris])
        # the stored base vectors came from the PyTorch model and the numpy whitening;
        # every runtime's graph (TTA views and whitening layer inside) gives them again
        _, base = retriever.items.store.active_base_vectors()
        for kind in ("onnx", "torchscript", "eager"):
            got = load_runtime(bundle, kind).embed(pixels)
            assert (got * base[:3]).sum(axis=1).min() > 0.9999, kind


def test_retriever_searches_with_aqe_over_the_augmented_gallery(stepped):
    _, _, _, bundle, _ = stepped
    with Retriever.load(bundle) as retriever:
        assert retriever.steps.steps == ["tta", "whiten", "dba", "aqe"]
        ids, searched = retriever.items.store.active_base_vectors()
        stored = retriever.items.store.vectors(ids.tolist())
        # the index holds the DBA of the base vectors over the whole gallery
        np.testing.assert_allclose(stored, database_augment(searched, 3, 3.0), atol=1e-5)
        query = searched[:4]
        hits = retriever.search(query, k=5)

        def search(x, k):
            s = x @ stored.T
            order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=1)[:, :k]
            return np.take_along_axis(s, order, axis=1), ids[order]

        lookup = {int(i): row for row, i in enumerate(ids)}
        scores, found, _ = search_with_steps(
            query, 5, search, lambda f: stored[[lookup[int(i)] for i in f]], aqe=AQE()
        )
        assert [[h.id for h in row] for row in hits] == found.tolist()
        np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
        # re-ranking per call: off by default for this bundle, on when asked
        reranked = retriever.search(query, k=5, rerank=True)
        assert [[h.score for h in row] for row in reranked] != [
            [h.score for h in row] for row in hits
        ]
        assert retriever.search(query, k=5, rerank=False) == hits


def test_items_added_later_are_augmented_like_a_rebuild_would(stepped, tmp_path):
    _, _, _, template, _ = stepped
    bundle = tmp_path / "bundle"
    shutil.copytree(template, bundle)
    new = tmp_path / "new.png"
    Image.effect_noise((90, 90), 60).convert("RGB").save(new)
    with Retriever.load(bundle) as retriever:
        ids, base = retriever.items.store.active_base_vectors()
        embedded = retriever.embed([new])
        report = retriever.add([new])
        (added,) = report.added
        got = retriever.items.store.vectors([added])
        new_ids, new_base = retriever.items.store.active_base_vectors()
    assert new_ids[-1] == added
    np.testing.assert_allclose(new_base[-1], embedded[0], atol=1e-6)
    # a rebuild: DBA over the whole gallery with the new item in it
    rebuilt = database_augment(np.concatenate([base, embedded]), 3, 3.0)[-1]
    np.testing.assert_allclose(got[0], rebuilt, atol=1e-5)
    np.testing.assert_allclose(got, dba_vectors_for(embedded, base, 3, 3.0), atol=1e-6)
    # and it is whitened: the model's output is 64-d
    assert embedded.shape == (1, 64)


def test_the_service_takes_rerank_per_request(stepped, tmp_path):
    _, _, _, template, _ = stepped
    bundle = tmp_path / "bundle"
    shutil.copytree(template, bundle)
    retriever = Retriever.load(bundle)
    image = Image.open(retriever.items.store.get([5])[0].uri).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    try:
        with TestClient(create_app(retriever, ServiceSettings())) as client:
            files = {"image": ("q.png", buffer.getvalue(), "image/png")}
            plain = client.post("/search?k=4", files=files).json()["results"]
            again = client.post("/search?k=4&rerank=false", files=files).json()["results"]
            reranked = client.post("/search?k=4&rerank=true", files=files).json()["results"]
            similar = client.get("/items/5/similar?k=4&rerank=true")
            bad = client.post("/search?k=4&rerank=maybe", files=files)
    finally:
        retriever.close()
    assert plain == again
    assert [h["score"] for h in reranked] != [h["score"] for h in plain]
    assert similar.status_code == 200 and len(similar.json()["results"]) == 4
    assert bad.status_code == 422


def test_precomputed_embeddings_refuse_steps_that_need_the_model(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "e.npz"
    np.savez(path, embeddings=x, labels=np.repeat(np.arange(10), 4))
    base = [f"paths.output_dir={tmp_path}/out", "logger=csv", f"embeddings={path}"]
    with pytest.raises(ValueError, match="postprocess.tta needs the model"):
        evaluate(compose_config([*base, "postprocess=[tta]"], name="evaluate"))
    with pytest.raises(ValueError, match="fit_on=train needs the training split"):
        evaluate(compose_config([*base, "postprocess=[whiten]"], name="evaluate"))
    metrics, objects = evaluate(
        compose_config(
            [*base, "postprocess=[whiten,rerank]", "postprocess.whiten.fit_on=gallery"],
            name="evaluate",
        )
    )
    expected = evaluate_embeddings(
        x,
        np.repeat(np.arange(10), 4),
        ks=[1, 2, 4, 8],
        metrics=list(compose_config(base, name="evaluate").metrics),
        postprocess=Postprocess.from_dict(
            {"whiten": {"fit_on": "gallery", "shrinkage": 0.1}, "rerank": {}}
        ),
    )
    assert metrics["test/recall@1"] == expected.metrics["recall@1"]
    assert metrics["test/map"] == expected.metrics["map"]
    assert objects["inputs"].result.index["postprocess"]["rerank"] == asdict(Rerank())


def _naive_whitening(x: np.ndarray, shrinkage: float, labels: np.ndarray | None):
    """PCA or learned whitening written out: ``(mean, projection)``, columns by eigenvalue."""
    x = x.astype(np.float64)
    mean = x.mean(axis=0)

    def shrink(c: np.ndarray) -> np.ndarray:
        return (1 - shrinkage) * c + shrinkage * np.trace(c) / len(c) * np.eye(len(c))

    def eig(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, vectors = np.linalg.eigh(c)
        order = np.argsort(-values)
        return np.clip(values[order], 0, None), vectors[:, order]

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        values, vectors = eig(c)
        return vectors / np.sqrt(values + 1e-6 * values.max())

    centred = x - mean
    if labels is None:
        return mean, inv_sqrt(shrink(centred.T @ centred / len(x)))
    pairs = [
        x[a] - x[b] for a in range(len(x)) for b in range(a + 1, len(x)) if labels[a] == labels[b]
    ]
    d = np.stack(pairs)
    first = inv_sqrt(shrink(d.T @ d / len(d)))
    z = centred @ first
    return mean, first @ eig(z.T @ z / len(z))[1]  # then a rotation onto z's principal axes


def _naive_steps_metrics(test, train, labels_train, method):
    """recall@1 and MAP@R of whitening (fitted on ``train``), DBA (k 3, α 3) and αQE (k 3,
    α 3), leave-one-out over ``test``, each step a plain loop (ties by ascending id)."""
    from tests.postprocess.test_postprocess import naive_evaluate, naive_order

    x, y = test["embeddings"], test["labels"]
    mean, projection = _naive_whitening(
        train["embeddings"], 0.1, labels_train if method == "learned" else None
    )
    w = (x - mean) @ projection
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    gallery = []
    for i in range(len(w)):
        s = w @ w[i]
        v = w[i].copy()
        for j in [j for j in naive_order(s) if j != i][:2]:
            v += max(s[j], 0) ** 3 * w[j]
        gallery.append(v / np.linalg.norm(v))
    gallery = np.array(gallery)
    queries = []
    for i in range(len(w)):
        s = gallery @ w[i]
        v = w[i].copy()
        for j in [j for j in naive_order(s) if j != i][:3]:
            v += max(s[j], 0) ** 3 * gallery[j]
        queries.append(v / np.linalg.norm(v))
    return naive_evaluate(np.array(queries), gallery, y, y, loo=True, k=1)


@pytest.mark.parametrize("dataset", ["demo", "emoji"])
def test_evaluate_with_steps_equals_the_steps_written_out(dataset, small_demo, tmp_path):
    if dataset == "demo":
        data = ["data=manifest", f"data.manifest={small_demo}", "data.image_size=64"]
        method = "pca"
    else:
        from tests.datasets.test_emoji import _fake_packages

        root = _fake_packages(tmp_path / "emoji")
        data = ["data=emoji", f"data.root={root}", "data.image_size=32"]
        method = "learned"
    common = [
        f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
        "data.num_workers=0",
        "logger=csv",
        "metrics=[recall,map@r]",
        "ks=[1]",
        *data,
    ]

    def run(out: str, *extra: str):
        return evaluate(
            compose_config([*common, f"paths.output_dir={tmp_path}/{out}", *extra], name="evaluate")
        )

    stepped, _ = run("steps", "postprocess=[whiten,dba,aqe]", f"postprocess.whiten.method={method}")
    run("test", "save_embeddings=true")
    run("train", "save_embeddings=true", "split=train")
    test = np.load(tmp_path / "test" / "embeddings.npz", allow_pickle=False)
    train = np.load(tmp_path / "train" / "embeddings.npz", allow_pickle=False)
    recall, map_r = _naive_steps_metrics(test, train, train["labels"], method)
    assert stepped["test/recall@1"] == pytest.approx(recall, abs=1e-9)
    assert stepped["test/map@r"] == pytest.approx(map_r, abs=1e-5)

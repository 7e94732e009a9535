"""Every option of every config group composes and instantiates."""

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from tests.conftest import CONF, compose_train

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


EVALUATE_ONLY = {"distractors", "index", "inference", "postprocess"}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS if g not in EVALUATE_ONLY for o in options(g)]
)
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "demo":
        overrides.append(f"data.{'manifest' if option == 'manifest' else 'root'}={tmp_path}")
    if group == "experiment":
        overrides.append(f"data.root={tmp_path}")
    if group == "loss":  # what train.py measures from the data and the model
        overrides += ["num_train_labels=10", "embedding_size=16"]
    cfg = compose_train(overrides, tmp_path)
    assert cfg.monitor == "val/recall@1"
    node = cfg.get(group)
    if group in ("loss", "optimizer", "scheduler", "sampler", "miner") and node is not None:
        assert instantiate(node) is not None
    if group in ("callbacks", "logger"):
        assert all(instantiate(n) is not None for n in node.values())
    if group == "backbone":
        with open_dict(cfg):
            cfg.backbone.pretrained = option == "efficientnet_lite0"
            if cfg.backbone.get("source") == "torchscript":  # its file is its weights
                from tests.models.test_torchscript_backbone import _script

                cfg.backbone.weights = str(_script(tmp_path / "descriptor.pt"))
        assert instantiate(cfg.backbone).num_features > 0


@pytest.mark.parametrize("name", ["evaluate", "export", "embed"])
def test_the_inference_group_is_shared_by_the_tasks_that_embed(name, tmp_path):
    from retrieval.tasks.config import compose_config

    overrides = [f"paths.output_dir={tmp_path}", "inference.runtime=onnx"]
    cfg = compose_config(overrides + (["out_dir=x"] if name == "embed" else []), name=name)
    assert set(cfg.inference) == {
        "device",
        "precision",
        "batch_size",
        "runtime",
        "use_cache",
        "cache_dir",
    }
    assert cfg.inference.runtime == "onnx" and cfg.inference.device == "auto"
    assert cfg.inference.batch_size == (64 if name == "embed" else None)
    assert all(key not in cfg for key in ("device", "precision", "batch_size", "use_cache"))


@pytest.mark.parametrize("option", options("index"))
def test_every_index_option_builds_a_searchable_index(option, tmp_path):
    import numpy as np

    from retrieval.index import EmbeddingIndex
    from retrieval.tasks.config import compose_config

    cfg = compose_config([f"index={option}", f"paths.output_dir={tmp_path}"], name="evaluate")
    assert cfg.get("data") is None and cfg.index.compare_exact is True
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = EmbeddingIndex(64, factory=cfg.index.factory, search_params=cfg.index.search_params)
    index.add(x)
    _, ids = index.search(x[:20], 1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9  # each vector finds itself


@pytest.mark.parametrize("name", ["evaluate", "export"])
def test_every_postprocess_option_composes_into_its_step(name, tmp_path):
    from retrieval.postprocess import STEPS, Postprocess
    from retrieval.tasks.config import compose_config

    # one option per step, named after it, and presets of a step under their own names
    presets = {"whiten_edits": ("whiten", "edits")}
    assert sorted(set(options("postprocess")) - set(presets)) == sorted(STEPS)
    for option in options("postprocess"):
        cfg = compose_config([f"postprocess=[{option}]", f"paths.output_dir={tmp_path}"], name=name)
        chosen = Postprocess.from_dict(dict(cfg.postprocess))
        step, method = presets.get(option, (option, None))
        assert chosen.steps == [step]
        assert method is None or getattr(chosen, step).method == method
    every = ",".join(reversed(STEPS))  # listed in any order, they run in STEPS' order
    cfg = compose_config([f"postprocess=[{every}]", f"paths.output_dir={tmp_path}"], name=name)
    assert Postprocess.from_dict(dict(cfg.postprocess)).steps == list(STEPS)
    default = compose_config([f"paths.output_dir={tmp_path}"], name=name).get("postprocess")
    if name == "export":  # the default bundle whitens with edited copies (conf/export.yaml)
        assert Postprocess.from_dict(dict(default)).whiten.method == "edits"
    else:
        assert default is None


def test_monitor_is_interpolated_everywhere(tmp_path):
    cfg = compose_train(["monitor=val/map@r", "callbacks=early_stopping"], tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == "val/map@r"
    assert cfg.callbacks.early_stopping.monitor == "val/map@r"


def test_unknown_keys_and_options_fail(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="loss/nope"):
        compose_train(["loss=nope"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="optimizer.lrr"):
        compose_train(["optimizer.lrr=0.1"], tmp_path)


def test_distractors_compose_onto_evaluate_only_when_asked(tmp_path):
    from retrieval.tasks.config import compose_config

    base = [f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs"]
    assert compose_config(base, name="evaluate").get("distractors") is None
    cfg = compose_config(
        [*base, "data=roxford5k", "data.root=/d", "+distractors=r1m", "distractors.root=/r"],
        name="evaluate",
    )
    assert cfg.distractors.root == "/r" and cfg.distractors.list_file == "revisitop1m.txt"
    assert cfg.distractors.name == "R1M" and cfg.distractors.shard_size == 10000
    assert cfg.distractors.shards_dir == f"{tmp_path}/logs/cache/distractors"

"""Common command-line mistakes get one line naming the key and the fix, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from retrieval.data.sampler import PKBatchSampler
from retrieval.models.backbone import _timm_backbone
from retrieval.tasks.preflight import problem_with
from retrieval.tasks.runs import reported

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lossx=triplet"], "no config group or key 'lossx' at the top; did you mean loss?"),
        (["loss=tripletx"], "loss has no option 'tripletx'; did you mean triplet_margin?"),
        (
            ["sampler.labels_per_bach=8"],
            "'labels_per_bach' under sampler; did you mean labels_per_batch?",
        ),
        (["model.embeder.pooling=gem"], "did you mean embedder?"),
        (
            ["data=folder"],
            "data.root is required and not given; e.g. python train.py data=folder "
            "data.root=/path/to/images",
        ),
    ],
)
def test_a_mistake_is_named_with_the_fix(overrides: list[str], expected: str) -> None:
    problem = problem_with("train", overrides)
    assert problem is not None and expected in problem
    assert "\n" not in problem


@pytest.mark.parametrize("name", ["train", "evaluate", "export"])
def test_the_default_commands_have_no_problem(name: str) -> None:
    assert problem_with(name, []) is None
    assert (
        problem_with(name, ["backbone=resnet18", "index=hnsw"] if name != "train" else []) is None
    )


def test_train_py_exits_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "lossx=triplet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: lossx=triplet: no config group or key 'lossx' at the top; did you mean loss? "
        "(a new key is added with +lossx=triplet)"
    ]


def test_an_unknown_timm_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"'resnet51x' \(backbone.name\): did you mean .*resnet50"):
        _timm_backbone("resnet51x", False, None, {})


def test_an_input_error_in_a_single_run_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def build(cfg: object) -> None:
        try:
            raise ValueError("unknown timm backbone 'resnet51x'")
        except ValueError as err:  # as hydra.utils.instantiate wraps it
            raise InstantiationException("Error in call to target") from err

    with pytest.raises(SystemExit) as exit_info:
        reported(build)(OmegaConf.create())
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unknown timm backbone 'resnet51x'\n"

    def bug(cfg: object) -> None:
        raise AttributeError("a bug keeps its traceback")

    with pytest.raises(AttributeError):
        reported(bug)(OmegaConf.create())


def test_the_small_dataset_hint_gives_values_that_work() -> None:
    labels = [f"l{i}" for i in range(10) for _ in range(5)] + ["x", "x", "y", "y"]
    with pytest.raises(ValueError) as info:
        PKBatchSampler(labels, labels_per_batch=16, samples_per_label=4)
    message = str(info.value)
    assert "this split has 10 labels with >= 4 images" in message
    assert message.endswith("use sampler.labels_per_batch=10 sampler.samples_per_label=4")
    PKBatchSampler(labels, labels_per_batch=10, samples_per_label=4)  # the values it gives work
    few = ["a", "a", "a", "b", "b", "c"]
    with pytest.raises(ValueError, match="labels_per_batch=2 sampler.samples_per_label=2"):
        PKBatchSampler(few, labels_per_batch=8, samples_per_label=4)
    PKBatchSampler(few, labels_per_batch=2, samples_per_label=2, batches_per_epoch=1)

"""A new user's first hour: mistakes answered with one line and a fix, before anything slow
loads (a taken port, a missing GPU, mismatched torch builds, a bundle path that is not there)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import retrieval.cli.common
from retrieval.cli import main
from retrieval.tasks.preflight import install_problem, installed_torch_problem, problem_with


def test_serve_on_a_taken_port_says_so_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bundle was opened before the port was checked")

    monkeypatch.setattr(retrieval.cli.common, "load", no_loading)
    monkeypatch.setattr("retrieval.cli.serve.load", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", str(tmp_path / "bundle"), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: port {port} on 127.0.0.1 is in use; pick another with --port\n"


@pytest.mark.parametrize(
    ("torch_version", "vision_version", "expected"),
    [
        (
            "2.14.1+cpu",
            "0.29.1+cu130",
            "torch 2.14.1+cpu and torchvision 0.29.1+cu130 are builds for different platforms "
            "(the CPU and CUDA 13.0), so torchvision's operators cannot load; reinstall a "
            "matching pair: pip install --force-reinstall torch==2.14.1 'torchvision==0.29.*' "
            "--index-url https://download.pytorch.org/whl/cpu",
        ),
        (
            "2.14.1+cu128",
            "0.29.1+cpu",
            "(CUDA 12.8 and the CPU)",
        ),
        (
            "2.14.1",
            "0.28.0",
            "do not belong together (torch 2.14 goes with torchvision 0.29)",
        ),
    ],
)
def test_mismatched_torch_builds_are_named_with_the_command_that_fixes_them(
    torch_version: str, vision_version: str, expected: str
) -> None:
    problem = install_problem(torch_version, vision_version)
    assert problem is not None and expected in problem and "\n" not in problem
    assert "pip install --force-reinstall" in problem


@pytest.mark.parametrize(
    ("torch_version", "vision_version"),
    [("2.14.1+cpu", "0.29.1+cpu"), ("2.14.1+cu130", "0.29.0+cu130"), ("2.5.1", "0.20.1+cpu")],
)
def test_matching_torch_builds_pass(torch_version: str, vision_version: str) -> None:
    assert install_problem(torch_version, vision_version) is None


def test_the_installed_pair_is_read_without_importing_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, version in (("torch", "2.14.1+cpu"), ("torchvision", "0.29.1+cu130")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not to be imported')\n")
        (tmp_path / name / "version.py").write_text(f"__version__ = '{version}'\ncuda = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("torch", "torchvision"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    problem = installed_torch_problem()
    assert problem is not None and "builds for different platforms" in problem


def test_train_on_a_gpu_without_one_names_the_cpu_trainers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert problem_with("train", ["trainer=gpu"]) is None  # the config itself is right
    problem = problem_with("train", ["trainer=gpu"], hardware=True)
    assert problem == (
        f"trainer=gpu trains on a GPU, and torch {torch.__version__} sees none; train on the "
        "CPU with trainer=default (or trainer=cpu)"
    )
    assert problem_with("train", ["trainer=cpu"], hardware=True) is None
    named = problem_with("train", ["experiment=cub200_resnet50", "data.root=/x"], hardware=True)
    assert named is not None and named.startswith("experiment=cub200_resnet50 trains on a GPU")


ROOT = Path(__file__).resolve().parents[2]
_PROBE = """
import runpy, sys
sys.argv = {argv!r}
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        from retrieval.cli import main
        raise SystemExit(main(sys.argv[1:]))
except SystemExit as done:
    heavy = sorted(m for m in ("torch", "lightning", "timm", "faiss") if m in sys.modules)
    print(done.code, ",".join(heavy) or "none")
"""


def answered_before_torch(argv: list[str], cwd: Path = ROOT) -> tuple[str, str]:
    """(stdout's last line: 'EXIT HEAVY-MODULES', stderr) of ``argv`` run in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return done.stdout.strip().splitlines()[-1], done.stderr


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["train.py", "loss=multi_similarty"], "did you mean multi_similarity?"),
        (["evaluate.py", "backbone=resnet5"], "backbone has no option 'resnet5'"),
        (["export.py", "data=folder"], "data.root is required"),
        (["retrieval", "info", "/nonexistent/bundle"], "does not exist or is not a folder"),
        (["retrieval", "search", "/nonexistent/bundle", "/nonexistent.jpg"], "does not exist"),
        (["retrieval", "duplicates", "/nonexistent/photos"], "neither a folder nor a bundle"),
    ],
)
def test_mistakes_are_answered_before_torch_loads(argv: list[str], said: str) -> None:
    outcome, err = answered_before_torch(argv)
    assert outcome == "2 none", err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0]


def test_score_checks_the_manifest_before_loading(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    outcome, err = answered_before_torch(["retrieval", "score", str(bundle), "no.csv"])
    assert outcome == "2 none" and "manifest file does not exist" in err


def train_py(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python train.py OVERRIDES`` in a fresh process, run from ``cwd``."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_a_failed_start_is_marked_and_never_becomes_latest(tmp_path: Path) -> None:
    from PIL import Image

    for label in range(4):  # halves of 2 labels: too few for the default 8-label batches
        (tmp_path / "photos" / f"l{label}").mkdir(parents=True)
        for index in range(3):
            colour = (60 * label, 40 * index, 90)
            Image.new("RGB", (32, 32), colour).save(
                tmp_path / "photos" / f"l{label}" / f"{index}.png"
            )
    logs = tmp_path / "logs"
    done = train_py(
        tmp_path,
        "data=folder",
        f"data.root={tmp_path / 'photos'}",
        f"paths.log_dir={logs}",
        f"paths.data_dir={tmp_path / 'data'}",
        "logger=csv",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    (run,) = [p for p in (logs / "train" / "runs").iterdir() if not p.is_symlink()]
    error = (run / "error.txt").read_text()
    assert error.startswith("error: sampler needs labels_per_batch=8") and error.count("\n") == 1
    assert error.strip() in (run / "train.log").read_text()
    assert not (logs / "train" / "runs" / "latest").exists()


def tiny_manifest(folder: Path) -> Path:
    """2 training labels of 3 images, 2 test labels of one image each: too little for the
    default P x K batches, and a test split with nothing to find."""
    from PIL import Image

    from retrieval.data.manifest import ManifestRow, write_manifest

    rows = []
    for label, split, count in (
        ("a", "train", 3),
        ("b", "train", 3),
        ("c", "test", 1),
        ("d", "test", 1),
    ):
        for index in range(count):
            path = folder / label / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (ord(label) * 2, 50 * index, 90)).save(path)
            rows.append(ManifestRow(path, label, split))
    return write_manifest(rows, folder / "manifest.csv")


def test_too_little_data_is_said_at_once_with_the_settings_of_a_run_that_works(
    tmp_path: Path,
) -> None:
    import re

    common = [
        "data=manifest",
        f"data.manifest={tiny_manifest(tmp_path)}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=csv",
        "baseline_pretrained=false",
        "trainer.max_epochs=1",
    ]
    done = train_py(tmp_path, *common)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert "sampler needs labels_per_batch=8 labels with at least 2 images" in line
    assert "no image of the validation split 'test' (2 images) has another of its label" in line
    fixes = re.findall(r"use (sampler\.labels_per_batch=\d+ sampler\.samples_per_label=\d+)", line)
    assert fixes == ["sampler.labels_per_batch=2 sampler.samples_per_label=3"]
    assert "+data.val_split=train" in line
    again = train_py(tmp_path, *common, *fixes[0].split(), "+data.val_split=train")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "best val/recall@1 = " in again.stdout


def test_one_labelled_image_per_class_leads_to_instance_training(tmp_path: Path) -> None:
    from retrieval.data.sampler import PKBatchSampler

    with pytest.raises(ValueError) as raised, pytest.warns(UserWarning, match="single image"):
        PKBatchSampler(["a", "a", "b", "c", "d"], labels_per_batch=2, samples_per_label=2)
    assert str(raised.value).endswith(
        "train every image as its own label: use sampler=instance sampler.images_per_batch=5"
    )

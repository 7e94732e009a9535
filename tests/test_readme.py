"""The documented commands are true: every `python train.py ...` line of the README and the
guides in docs/ composes as written."""

import shlex

import pytest

from retrieval.tasks.config import compose_config
from tests.conftest import compose_train
from tests.documents import ROOT, bash_lines


def commands(script: str = "train") -> list[str]:
    lines = bash_lines()
    return [line.split("&&")[-1].strip() for line in lines if f"python {script}.py" in line]


def train_commands() -> list[str]:
    return commands("train")


def test_readme_documents_the_main_commands():
    train = train_commands()
    assert "python train.py" in train
    assert any("backbone=resnet50" in c and "data=cub200" in c and "data.root=" in c for c in train)
    text = (ROOT / "README.md").read_text()
    # the contributor's test command is what CI runs
    tests = 'pip install -e ".[dev,milvus,milvus-server,openvino]" && python -m pytest'
    ci_tests = tests.replace(" && python -m pytest", " && mypy retrieval && python -m pytest")
    assert tests in text and ci_tests in (ROOT / ".ci" / "run").read_text()
    cpu = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in text and cpu in (ROOT / "pyproject.toml").read_text()
    assert "download.pytorch.org/whl/cu12" in text  # CUDA 12, as faiss-gpu-cu12
    evaluate = commands("evaluate")
    assert "python evaluate.py" in evaluate
    for mode in ("ckpt_path=", "embeddings=", "index="):
        assert any(mode in c for c in evaluate), mode
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in ci
    assert "ruff check ." in ci and "ruff format --check ." in ci  # the house style, enforced
    assert "mypy retrieval" in ci


@pytest.mark.parametrize(
    "command",
    [*train_commands(), *commands("evaluate"), *commands("export"), *commands("embed")],
)
def test_readme_command_composes(command, tmp_path):
    overrides = [o for o in shlex.split(command)[2:] if o not in ("-m", "--multirun")]
    script = command.split()[1].removesuffix(".py")
    if script in ("evaluate", "export", "embed"):
        cfg = compose_config([f"paths.output_dir={tmp_path}", *overrides], name=script)
    else:
        cfg = compose_train(overrides, tmp_path)
    from retrieval.tasks.preflight import problem_with

    assert problem_with(script, overrides) is None  # what the entry point checks first
    for override in overrides:
        key, _, value = override.partition("=")
        if "." in key and not key.startswith(("+", "hydra.", "hydra/")):
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, (key, node, value)

"""The README's commands are true: every `python train.py ...` line composes as written."""

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]


def train_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line.split("&&")[-1].strip() for line in lines if "python train.py" in line]


def test_readme_documents_the_main_commands():
    commands = train_commands()
    assert "python train.py" in commands
    assert any(
        "backbone=resnet50" in c and "data=cub200" in c and "data.root=" in c for c in commands
    )
    text = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[dev]" && python -m pytest' in text
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", train_commands())
def test_readme_train_command_composes(command, tmp_path):
    overrides = shlex.split(command)[2:]
    cfg = compose_train(overrides, tmp_path)
    for override in overrides:
        key, _, value = override.partition("=")
        if "." in key and not key.startswith("+"):
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, (key, node, value)

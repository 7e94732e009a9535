"""The preflight of an entry point: suggestions from the task's own config groups, one
``error:`` line for every override Hydra cannot compose, and values of the wrong type."""

from __future__ import annotations

import pytest

from retrieval.tasks.preflight import check_command_line, problem_with


def test_suggestions_come_from_the_tasks_own_groups() -> None:
    problem = problem_with("export", ["model.x=1"])
    assert problem is not None and "\n" not in problem
    assert "did you mean model" not in problem  # export has no model group to offer
    assert "export has no config group 'model'" in problem


@pytest.mark.parametrize(
    ("name", "override", "expected"),
    [
        ("export", "loss=tripletx", "export has no config group 'loss'"),
        ("export", "~model", "export has no config group 'model'"),
        ("export", "", "an empty override"),
        ("export", "noequals", "'noequals' is not an override"),
        ("train", "noequals", "'noequals' is not an override"),
        ("train", "~nokey", "~nokey: the config has no key nokey to delete"),
    ],
)
def test_overrides_hydra_cannot_compose_are_one_line(name: str, override: str, expected: str):
    problem = problem_with(name, [override])
    assert problem is not None and "\n" not in problem
    assert expected in problem


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer or null, got 'abc'"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs must be an integer or null, got 1.5"),
        ("model.embedder.embedding_dim=wide", "model.embedder.embedding_dim must be an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_the_type(override: str, expected: str) -> None:
    problem = problem_with("train", [override])
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"{override}: ") and expected in problem


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_epochs=3",
        "trainer.max_epochs=null",
        "trainer.devices=auto",
        "trainer.precision=16-mixed",
        "model.embedder.embedding_dim=null",
        "optimizer.lr=0.001",
    ],
)
def test_values_of_the_right_type_pass(override: str) -> None:
    assert problem_with("train", [override]) is None


@pytest.mark.parametrize("override", ["", "noequals", "~model", "loss=tripletx"])
def test_export_exits_2_with_one_error_line(
    override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_command_line("export", [override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")

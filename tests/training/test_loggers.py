import pytest

from retrieval.training import loggers


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_offline_without_credentials(no_credentials):
    assert not loggers.wandb_logged_in()
    assert loggers.wandb_mode() == "offline"


def test_netrc_login_is_detected_and_unreachable_host_means_offline(
    no_credentials, monkeypatch, tmp_path
):
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert loggers.wandb_logged_in()
    monkeypatch.setattr(loggers, "network_reachable", lambda host: False)
    assert loggers.wandb_mode() == "offline"
    monkeypatch.setattr(loggers, "network_reachable", lambda host: host == "api.wandb.ai")
    assert loggers.wandb_mode() == "online"


def test_user_choice_wins(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode() == "disabled"


def test_finished_runs_are_not_reused_by_the_next_logger(tmp_path, monkeypatch):
    import wandb

    from retrieval.training.loggers import finish_wandb, wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_logger(save_dir=str(tmp_path / "a"))
    first.log_metrics({"x": 1.0})
    finish_wandb(first)
    assert wandb.run is None
    second = wandb_logger(save_dir=str(tmp_path / "b"))
    second.log_metrics({"x": 2.0})
    assert second.experiment.id != first.experiment.id
    finish_wandb(second)
    finish_wandb(wandb_logger(save_dir=str(tmp_path / "c")))  # never started: nothing to do

"""Fast checks of the pieces the stack tests exercise end to end: run names, headline metrics, the stale-run sweep, what
counts as an unreachable tracking server, the experiment's kind, and the stack's configuration."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import mlflow
import pytest
import requests

from flows import stack
from flows.pipeline import changed_params, end_stale_runs, headline_metrics, run_name
from stages.lib.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_KIND,
    ensure_experiment,
    flat_params,
    server_unreachable,
)


def test_run_names_say_what_changed_first():
    tags = {"rlhf.git_commit": "256f025abcdef-dirty"}
    before = {"ppo.kl_coef": "0.2", "ppo.num_steps": "20", "git_commit": "256f025abcdef", "data_md5": "aa"}
    now = {**before, "ppo.kl_coef": "0.1", "git_commit": "256f025abcdef-dirty"}
    name = run_name(tags, now, SimpleNamespace(params=before), now=0)
    assert name.startswith("ppo.kl_coef 0.2->0.1 · 256f025+ · 19")  # then the date and time (1970 or 1969 by zone)
    assert run_name(tags, now, None).startswith("first run · 256f025+")
    assert run_name(tags, before, SimpleNamespace(params=before)).startswith("same params")
    assert run_name(
        {"rlhf.git_commit": "1111111"}, {**before, "git_commit": "1111111"}, SimpleNamespace(params=before)
    ).startswith("code changed · 1111111")
    many = {**before, "ppo.kl_coef": "1", "ppo.num_steps": "2", "data_md5": "bbbbbbbbbb"}
    assert changed_params(before, many) == ["ppo.kl_coef 0.2->1", "ppo.num_steps 20->2", "data bbbbbbbb"]
    assert " +1 more · " in run_name(tags, many, SimpleNamespace(params=before))


def test_flat_params_are_the_keys_both_runs_log():
    assert flat_params({"ppo": {"kl_coef": 0.2, "kl_guard": {"patience": 3}}, "precision": "auto"}) == {
        "ppo.kl_coef": "0.2",
        "ppo.kl_guard.patience": "3",
        "precision": "auto",
    }


def test_headline_metrics_follow_paths_and_skip_non_numbers(tmp_path):
    (tmp_path / "artifacts/ppo").mkdir(parents=True)
    (tmp_path / "artifacts/ppo/metrics.json").write_text(
        json.dumps(
            {"final": {"objective/kl": 0.5, "objective/scores": float("nan")}, "steps_done": 3, "outcome": "completed"}
        )
    )
    assert headline_metrics(tmp_path, "ppo") == {"objective/kl": 0.5, "ppo/steps_done": 3.0}
    assert headline_metrics(tmp_path, "evaluate") == {}  # not run yet


class _Client:
    """A stand-in MLflow client holding runs by id."""

    def __init__(self, runs):
        self.runs = {r.info.run_id: r for r in runs}
        self.ended: dict[str, str] = {}

    def search_runs(self, _ids, query, max_results=1000):
        assert query == "attributes.status = 'RUNNING'"
        return [r for r in self.runs.values() if r.info.status == "RUNNING"]

    def get_run(self, run_id):
        return self.runs[run_id]

    def set_tag(self, run_id, key, value):
        self.runs[run_id].data.tags[key] = value

    def set_terminated(self, run_id, status):
        self.ended[run_id] = status


def _run(run_id, status="RUNNING", **tags):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status), data=SimpleNamespace(tags=tags))


def test_stale_runs_are_ended_only_when_their_flow_is_over():
    runs = [
        _run("p-over", **{"rlhf.stage": "pipeline", "prefect.flow_run_id": "over"}),
        _run("c-over", **{"rlhf.stage": "ppo", "mlflow.parentRunId": "p-over"}),
        _run("p-live", **{"rlhf.stage": "pipeline", "prefect.flow_run_id": "live"}),
        _run("c-live", **{"rlhf.stage": "ppo", "mlflow.parentRunId": "p-live"}),
        _run("p-done", status="FINISHED", **{"rlhf.stage": "pipeline"}),
        _run("c-orphan", **{"rlhf.stage": "sft", "mlflow.parentRunId": "p-done"}),
        _run("plain", **{"rlhf.stage": "sft"}),
    ]
    client = _Client(runs)
    assert end_stale_runs(client, "1", lambda flow_run: flow_run == "over") == ["c-orphan", "c-over", "p-over"]
    assert set(client.ended.values()) == {"FAILED"} and "rlhf.ended_by" in client.runs["p-over"].data.tags


def test_a_run_with_nothing_new_still_ends_the_runs_a_finished_flow_left_running(tmp_path, monkeypatch):
    """The sweep a working run does when it opens its parent run, done too by a run that opens none (a real store)."""
    import flows.pipeline as pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "night")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("night", artifact_location=str(tmp_path / "mlruns"))
    left = client.create_run(experiment, tags={"rlhf.stage": "pipeline", "prefect.flow_run_id": "over"}).info.run_id
    live = client.create_run(experiment, tags={"rlhf.stage": "pipeline", "prefect.flow_run_id": "live"}).info.run_id
    monkeypatch.setattr(pipeline, "flow_run_over", lambda flow_run: flow_run == "over")  # the Prefect server's word
    assert pipeline._end_stale(tmp_path) == [left]
    assert client.get_run(left).info.status == "FAILED" and client.get_run(live).info.status == "RUNNING"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "not made yet")
    assert pipeline._end_stale(tmp_path) == []


def test_what_counts_as_an_unreachable_server():
    from mlflow.exceptions import MlflowException, RestException

    assert server_unreachable(requests.exceptions.ConnectionError("refused"))
    assert server_unreachable(
        MlflowException(
            "API request to http://x/api/2.0/mlflow/runs/get failed with exception "
            "HTTPConnectionPool(...): Max retries exceeded"
        )
    )
    assert server_unreachable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "db"}))
    assert not server_unreachable(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not server_unreachable(MlflowException("Registered Model with name=x not found"))
    assert not server_unreachable(ValueError("a bug"))


def test_the_experiment_opens_on_its_runs(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = ensure_experiment("rlhf", str(tmp_path / "mlruns"), client)
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development_inferred")  # the UI's guess
    assert ensure_experiment("rlhf", None, client) == experiment_id
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")  # someone's own choice
    ensure_experiment("rlhf", None, client)
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_stack_configuration_saved_then_environment_then_flags(tmp_path, monkeypatch):
    home = tmp_path / "s"
    home.mkdir()
    (home / "stack.json").write_text(json.dumps({"config": {"dir": str(home), "pg_port": 6000, "mlflow_port": 6001}}))
    monkeypatch.setenv("RLHF_STACK_MLFLOW_PORT", "7001")
    config = stack.config_from(tmp_path, {"dir": str(home), "prefect_port": 8000, "ssh_port": None})
    assert (config.pg_port, config.mlflow_port, config.prefect_port, config.ssh_port) == (6000, 7001, 8000, 2222)
    assert config.host == "127.0.0.1" and config.user == ("rlhf-stack" if os.geteuid() == 0 else config.user)
    assert config.mlflow_url == "http://127.0.0.1:7001" and config.prefect_api_url == "http://127.0.0.1:8000/api"
    assert config.remote_url.startswith(f"ssh://{config.user}@127.0.0.1:2222/") and config.remote_url.endswith(
        "dvc-remote"
    )
    assert stack.config_from(tmp_path).home == (tmp_path / ".rlhf/stack").resolve()
    assert "5433" not in config.db_url("mlflow", "pw") and config.db_url("mlflow", "pw").startswith(
        "postgresql+psycopg://"
    )


def test_process_identity_survives_pid_reuse():
    me = [os.getpid(), stack._start_time(os.getpid())]
    assert stack._alive(me) and not stack._alive([me[0], me[1] + 1]) and not stack._alive(None)
    assert os.getpid() not in stack._children(os.getpid())


@pytest.mark.parametrize("service", stack.SERVICES)
def test_every_service_has_a_starter_and_a_health_check(service):
    assert service in stack.STARTERS and service in stack.HEALTH


@pytest.fixture
def sshd_missing(monkeypatch, tmp_path):
    """This machine without Debian's openssh-server, until the (stand-in) installer has run."""
    installed = tmp_path / "installed"
    real_find = stack._find
    monkeypatch.setattr(
        stack, "_find", lambda name, *f: None if name == "sshd" and not installed.exists() else real_find(name, *f)
    )
    installer = tmp_path / "debian-packages.sh"
    installer.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "asked"}\ntouch {installed}\n')
    installer.chmod(0o755)
    monkeypatch.setattr(stack, "INSTALLER", installer)
    return tmp_path


def test_stack_up_names_the_exact_install_command_when_it_cannot_install(sshd_missing, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert stack.missing_packages() == ["openssh-server"]
    with pytest.raises(stack.StackError) as e:
        stack.install_missing()
    assert "openssh-server" in str(e.value) and f"sudo {stack.INSTALLER} openssh-server" in str(e.value)
    assert not (sshd_missing / "asked").exists()
    config = stack.config_from(sshd_missing, {"dir": str(sshd_missing / "stack")})
    assert "missing: Debian's openssh-server" in stack.format_status(config, stack.status(config))


def test_stack_up_installs_what_is_missing_as_root(sshd_missing, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    said: list[str] = []
    assert stack.install_missing(said.append) == ["openssh-server"]
    assert (sshd_missing / "asked").read_text().split() == ["openssh-server"]
    assert "installing Debian's openssh-server" in said[0]
    assert stack.install_missing(said.append) == [] and len(said) == 1  # present now: nothing to do

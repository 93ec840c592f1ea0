"""What a pipeline command gives back however it ends (flows/lifecycle.py): the project lock, the temporary Prefect
server, and the MLflow runs of a killed run; then the whole flow killed with SIGKILL mid-stage and run again."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from flows.lifecycle import Busy, close_dead_runs, project_lock
from stages.lib.outcome import ExitCode
from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, env, make_project

TAKE_LOCK = (
    "import sys; from pathlib import Path; from flows.lifecycle import project_lock\n"
    "with project_lock(Path(sys.argv[1])): pass"
)


def test_one_run_per_checkout(tmp_path):
    # another process is refused, in one line and with the busy code, while this one holds the lock; re-entrant in
    # this process (`rlhf run --prefect` holds it and the flow it runs takes it again), held until the outer block ends
    (tmp_path / "dvc.yaml").write_text("stages:\n  validate:\n    cmd: echo\n")
    with project_lock(tmp_path):
        with project_lock(tmp_path):
            pass
        proc = subprocess.run(
            [str(BIN / "rlhf"), "run"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300
        )
        other = subprocess.run(
            [sys.executable, "-c", TAKE_LOCK, str(tmp_path)], env=env(), capture_output=True, text=True
        )
    assert proc.returncode == ExitCode.BUSY and "another rlhf run is running" in proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr
    assert other.returncode == 1 and f"{Busy.__name__}: another rlhf run is running" in other.stderr
    released = subprocess.run(
        [sys.executable, "-c", TAKE_LOCK, str(tmp_path)], env=env(), capture_output=True, text=True
    )
    assert released.returncode == 0, released.stderr


def test_runs_of_a_dead_process_are_ended_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("rlhf", str(tmp_path / "mlruns"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    host = socket.gethostname()
    orphan = client.create_run(experiment, tags={"rlhf.host": host, "rlhf.pid": str(dead.pid)}).info.run_id
    alive = client.create_run(experiment, tags={"rlhf.host": host, "rlhf.pid": str(os.getpid())}).info.run_id
    elsewhere = client.create_run(experiment, tags={"rlhf.host": "another-host", "rlhf.pid": str(dead.pid)}).info.run_id
    assert close_dead_runs(uri, "rlhf") == [orphan]
    assert (
        client.get_run(orphan).info.status == "KILLED" and client.get_run(orphan).data.tags["rlhf.outcome"] == "killed"
    )
    assert client.get_run(alive).info.status == client.get_run(elsewhere).info.status == "RUNNING"


CHILD = """
import sys, time
from flows.lifecycle import temporary_prefect_server
with temporary_prefect_server() as url:
    print(url, flush=True)
    time.sleep(600)
"""


def _uvicorn_children(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_the_temporary_prefect_server_dies_with_its_command(tmp_path):
    """SIGKILL of the command (which can clean nothing up): the kernel stops its server all the same."""
    e = {**env(), "PREFECT_HOME": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, "-c", CHILD], env=e, stdout=subprocess.PIPE, text=True)
    url = parent.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:")
    servers = _uvicorn_children(parent.pid)
    assert servers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(servers, timeout=60)
    assert not alive, [p.cmdline() for p in alive]


def _md5s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


SMALL = {
    "reward_gate": OPEN_GATE,
    "dpo": {"enabled": False},
    "evaluate": {"n_prompts": 8, "max_new_tokens": 8, "best_of_n": [1, 2]},
    "ppo": {
        "num_steps": 2,
        "batch_size": 8,
        "ppo_epochs": 1,
        "response_length": 8,
        "checkpoint_every": 1,
        "n_monitor": 4,
        "threads": 1,
    },
    "promote": OPEN_PROMOTE,
}


@pytest.mark.slow
def test_kill_9_mid_stage_then_a_rerun_gives_the_uninterrupted_artifacts(tmp_path):
    a, b = make_project(tmp_path / "a", SMALL), make_project(tmp_path / "b", SMALL)
    e = {**env(), "PREFECT_HOME": str(tmp_path / "prefect")}
    e.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [str(BIN / "rlhf"), "run", "--prefect"], cwd=a, env=e, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error logging to API" not in done.stdout + done.stderr  # its last logs reached the server before it stopped

    proc = subprocess.Popen(
        [str(BIN / "rlhf"), "run", "--prefect"],
        cwd=b,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 900
    for line in proc.stdout:  # wait until SFT is training, then kill the whole command without warning
        if "Task run 'sft'" in line and "{'loss'" in line:
            break
        assert time.monotonic() < deadline, "SFT never started"
    servers = _uvicorn_children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(servers, timeout=60)
    assert not alive, "the temporary Prefect server outlived its command"

    again = subprocess.run(
        [str(BIN / "rlhf"), "run", "--prefect"], cwd=b, env=e, capture_output=True, text=True, timeout=1800
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "a killed run had left RUNNING" in again.stdout + again.stderr
    for folder in (
        "artifacts/validate/data",
        "artifacts/sft/model",
        "artifacts/reward/model",
        "artifacts/ppo/model",
        "artifacts/evaluate",
    ):
        assert _md5s(a / folder) == _md5s(b / folder), folder
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{b / 'mlflow.db'}")
    runs = client.search_runs([x.experiment_id for x in client.search_experiments()])
    assert runs and not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert {r.data.tags["rlhf.stage"] for r in killed} >= {"pipeline", "sft"}
    assert json.loads((b / "artifacts/promote/metrics.json").read_text())["promoted"] is True

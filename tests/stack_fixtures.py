"""Session fixtures for the stack tests (tests/test_stack.py, tests/test_ui.py): one real stack started from nothing
(`rlhf stack up` on free loopback ports, PostgreSQL and sshd installed from Debian when missing), a team's git
origin, project A that runs the pipeline against the stack and pushes, and clone B that pulls."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from flows import stack as stack_mod
from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, ROOT, clear_schedules, deep_merge, env, make_project

# The tiny pipeline of tests/test_flow.py (PASSING): every stage runs in seconds and the promotion criteria pass.
PASSING: dict[str, Any] = {
    "reward_gate": OPEN_GATE,
    "ppo": {
        "num_steps": 2,
        "batch_size": 8,
        "ppo_epochs": 1,
        "response_length": 12,
        "checkpoint_every": 1,
        "n_monitor": 4,
        "keep": "last",
    },  # a trained policy, never step 0: the second run must promote
    "evaluate": {"n_prompts": 16, "max_new_tokens": 12},
    "promote": OPEN_PROMOTE,
}
GIT = ["git", "-c", "user.name=rlhf test", "-c", "user.email=rlhf-test@localhost"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def sh(
    cmd: list[str], cwd: Path, extra: dict[str, str] | None = None, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class Stack:
    config: stack_mod.StackConfig
    startup_seconds: float
    client_env: dict[str, str]  # what `rlhf run --stack` and any client needs, PREFECT_HOME of its own included

    @property
    def mlflow(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.config.mlflow_url)

    def prefect(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """A Prefect REST call by hand (prefect 3.8.8's client sends unset limits as null, which its server refuses)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.config.prefect_api_url}{path}",
            data=data,
            method="POST" if data else "GET",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.prefect(f"/flow_runs/{flow_run_id}")

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.prefect(
            "/task_runs/filter",
            {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200, "sort": "EXPECTED_START_TIME_ASC"},
        )

    def experiment_id(self, experiment: str = "rlhf") -> str:
        return self.mlflow.get_experiment_by_name(experiment).experiment_id

    def runs(self, query: str = "", experiment: str = "rlhf") -> list[Any]:
        return self.mlflow.search_runs([self.experiment_id(experiment)], query, max_results=1000)

    def parents(self, experiment: str = "rlhf") -> list[Any]:
        """Pipeline runs, newest first."""
        return self.mlflow.search_runs(
            [self.experiment_id(experiment)], "tags.`rlhf.stage` = 'pipeline'", order_by=["attributes.start_time DESC"]
        )

    def children(self, parent_run_id: str, experiment: str = "rlhf") -> dict[str, Any]:
        return {
            r.data.tags["rlhf.stage"]: r for r in self.runs(f"tags.mlflow.parentRunId = '{parent_run_id}'", experiment)
        }


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """`rlhf stack up` from nothing in a fresh folder on free loopback ports; `rlhf stack down` at the end, which must
    leave no process behind."""
    # on CI's clean machine (root) `rlhf stack up` itself installs Debian's postgresql and openssh-server
    if os.geteuid() != 0 and stack_mod.missing_packages():
        pytest.skip(f"needs Debian's {stack_mod.missing_packages()} (as root `rlhf stack up` installs them)")
    # outside pytest's own tmp folders (mode 0700): the stack's service user must reach its folders
    home = Path(tempfile.mkdtemp(prefix="rlhf-stack-test-"))
    home.chmod(0o755)
    pg, prefect, ml, ssh, ls = free_ports(5)
    client = {"PREFECT_HOME": str(home / "client-prefect")}
    t0 = time.monotonic()
    up = sh(
        [
            str(BIN / "rlhf"),
            "stack",
            "up",
            "--dir",
            str(home / "stack"),
            "--pg-port",
            str(pg),
            "--prefect-port",
            str(prefect),
            "--mlflow-port",
            str(ml),
            "--ssh-port",
            str(ssh),
            "--label-studio-port",  # Label Studio too (tests/test_label_round.py)
            str(ls),
            "--no-deploy",
        ],
        home,
        client,
        check=False,
        timeout=1800,
    )
    seconds = time.monotonic() - t0
    config = stack_mod.config_from(home, {"dir": str(home / "stack")})
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"\nstack up from nothing in {seconds:.1f} s:\n{up.stdout}")
        yield Stack(config, seconds, {**client, **stack_mod.urls(config)})
    finally:
        _down_leaves_nothing(home, config)


def _down_leaves_nothing(home: Path, config: stack_mod.StackConfig) -> None:
    state = json.loads((config.home / "stack.json").read_text()) if (config.home / "stack.json").exists() else {}
    ours = [tuple(p) for p in state.get("procs", {}).values()]
    if (postmaster := stack_mod._postmaster(config)) is not None:
        ours.append(tuple(postmaster))
    family = [(pid, stack_mod._start_time(pid)) for p in ours for pid in [p[0], *stack_mod._children(p[0])]]
    down = sh([str(BIN / "rlhf"), "stack", "down", "--dir", str(config.home)], home, check=False, timeout=600)
    left = [pid for pid, start in family if start is not None and stack_mod._start_time(pid) == start]
    shutil.rmtree(home, ignore_errors=True)
    assert down.returncode == 0 and not left, f"rlhf stack down left {left}: {down.stdout}{down.stderr}"


# ---------------------------------------------------------------------------------------------------------------------
# A team: a git origin, project A (runs the pipeline against the stack, pushes), clone B (pulls)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Team:
    origin: Path
    a: Path
    b: Path
    stack: Stack

    def run(
        self,
        project: Path | None = None,
        extra: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 1200,
    ) -> subprocess.CompletedProcess[str]:
        """`rlhf run --prefect --stack-dir ...` in project A (or `project`)."""
        return sh(
            [str(BIN / "rlhf"), "run", "--prefect", "--stack-dir", str(self.stack.config.home)],
            project or self.a,
            {**self.stack.client_env, **(extra or {})},
            check,
            timeout,
        )

    def start_run(self, log: Path, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
        with log.open("w") as f:
            return subprocess.Popen(
                [str(BIN / "rlhf"), "run", "--prefect", "--stack-dir", str(self.stack.config.home)],
                cwd=self.a,
                env={**env(), **self.stack.client_env, **(extra or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def set_params(self, changes: dict[str, Any]) -> None:
        """Change params.yaml in A (e.g. {"ppo": {"kl_coef": 0.2}})."""
        path = self.a / "params.yaml"
        path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(path.read_text()), changes), sort_keys=False))

    def commit(self, message: str, project: Path | None = None) -> str:
        where = project or self.a
        sh(["git", "add", "-A"], where)
        sh([*GIT, "commit", "-q", "--allow-empty", "-m", message], where)
        return sh(["git", "rev-parse", "HEAD"], where).stdout.strip()


@pytest.fixture(scope="session")
def team(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Team:
    """Project A: the tiny pipeline with prefect.yaml and flows/ (what the worker runs), the stack's SSH store as its
    DVC remote, committed and pushed to a bare origin; clone B made from that origin before anything ran."""
    root = tmp_path_factory.mktemp("team")
    origin = root / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    a = make_project(root / "a", deep_merge(PASSING, {}))
    shutil.copy(ROOT / "prefect.yaml", a)
    shutil.copytree(ROOT / "flows", a / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    with (a / ".gitignore").open("a") as f:
        f.write("__pycache__/\n")
    sh(["git", "checkout", "-q", "-b", "main"], a)
    sh([str(BIN / "rlhf"), "stack", "remote", "--dir", str(stack.config.home)], a)  # URL in .dvc/config, key local
    team = Team(origin, a, root / "b", stack)
    team.commit("the project")
    sh(["git", "remote", "add", "origin", str(origin)], a)
    sh(["git", "push", "-q", "origin", "main"], a)
    sh(["git", "clone", "-q", str(origin), str(team.b)], root)
    # each person's own key: the one local setting a teammate makes
    sh(
        [
            sys.executable,
            "-m",
            "dvc",
            "remote",
            "modify",
            "--local",
            "stack",
            "keyfile",
            stack_mod.urls(stack.config)["dvc_keyfile"],
        ],
        team.b,
    )
    return team


@dataclass
class Ran:
    proc: subprocess.CompletedProcess[str]
    seconds: float
    parent: Any  # the MLflow parent run
    flow_run_id: str


@pytest.fixture(scope="session")
def first(team: Team) -> Ran:
    """The default (tiny) pipeline against the stack: `rlhf run --prefect --stack-dir`."""
    t0 = time.monotonic()
    proc = team.run()
    seconds = time.monotonic() - t0
    parent = team.stack.parents()[0]
    return Ran(proc, seconds, parent, parent.data.tags["prefect.flow_run_id"])


SECOND_KL_COEF = 0.2  # the second run's ppo.kl_coef: not params.yaml's default


@pytest.fixture(scope="session")
def by_worker(first, team: Team, stack: Stack):
    """A second pipeline run differing only in ppo.kl_coef, as prefect.yaml's rlhf-process deployment run by the
    stack's worker."""
    assert stack_mod.register_deployment(stack.config, team.a, print)
    client = {**stack.client_env, "PREFECT_API_URL": stack.config.prefect_api_url}
    clear_schedules("rlhf-pipeline/rlhf-process", team.a, client)
    team.set_params({"ppo": {"kl_coef": SECOND_KL_COEF}})
    triggered = sh([str(BIN / "prefect"), "deployment", "run", "rlhf-pipeline/rlhf-process"], team.a, client)
    flow_run_id = triggered.stdout.split("UUID:")[1].split()[0]
    t0 = time.monotonic()
    state = wait_for(
        "the deployment's flow run",
        lambda: (
            (s := stack.flow_run(flow_run_id))
            and s["state"]
            and s["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            and s
        ),
        900,
        2,
    )
    return {"flow_run": state, "flow_run_id": flow_run_id, "seconds": time.monotonic() - t0}


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None and value is not False:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ppo_step(stack: Stack, at_least: int) -> str | None:
    """The id of a RUNNING PPO run that has logged at least `at_least` steps, if there is one."""
    for run in stack.runs("tags.`rlhf.stage` = 'ppo' and attributes.status = 'RUNNING'"):
        if len(stack.mlflow.get_metric_history(run.info.run_id, "objective/kl")) >= at_least:
            return run.info.run_id
    return None


def one_line_reason(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("the pipeline stopped:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def flow_run_of(parent: Any) -> str:
    return parent.data.tags["prefect.flow_run_id"]


def md5_tree(path: Path) -> dict[str, str]:
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def dvc_outs(project: Path) -> list[str]:
    """Every output dvc.lock records (what `dvc push` ships and `dvc pull` brings back)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return sorted({"data"} | {o["path"] for s in lock.values() for o in s.get("outs", [])})  # data: data.dvc


def name_of(parent: Any) -> str:
    return re.sub(r"\s+", " ", parent.info.run_name)

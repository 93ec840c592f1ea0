"""The stage image, built and run for real: a Docker engine (started if none runs), a base image made from Debian's
packages (no registry is reachable here), `docker/build.sh` (what `make images` runs), then stages in containers on a
tiny project, and the whole flow with `--runner docker`.

Takes ~6-8 minutes on 2 cores with a cold engine (the image build is ~3 of them); deselect with -m "not docker".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.runners import Runner
from stages.lib.outcome import ExitCode
from tests.helpers import BIN, ROOT, env, make_project, run
from tests.test_flow import PASSING, _overrides, flow_run_id_of, prefect_deploy, prefect_server

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "rlhf-stage:test"
BASE = "local/debian:bookworm"
UID = 1000  # the image's non-root user


def _pip_config(key: str) -> str | None:
    """A value from this machine's pip configuration (e.g. cert, find-links), which the image build reuses."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.split(".")[-1] == key and value:
            return value.strip("'\"")
    return None


@pytest.fixture(scope="module")
def image() -> str:
    """The stage image, built by docker/build.sh from a debootstrapped Debian base (tens of seconds when cached)."""
    for script in ("engine.sh", "debian-base.sh"):
        done = subprocess.run([str(ROOT / "docker" / script)], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"docker/{script}: {done.stdout}\n{done.stderr}"
    build_env = {**env(), "IMAGE": IMAGE, "BASE_IMAGE": BASE}
    # This machine reaches PyPI through a TLS-intercepting proxy (pip's `cert`) and keeps a local CPU torch wheel.
    if (cert := _pip_config("cert")) and Path(cert).is_file():
        build_env["EXTRA_CA"] = cert
    wheels = _pip_config("find-links")
    if wheels and list(Path(wheels).glob("torch-2.13.0*.whl")):
        build_env["TORCH_WHEELS"] = wheels
    done = subprocess.run(
        [str(ROOT / "docker/build.sh")], cwd=ROOT, env=build_env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, f"docker/build.sh:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return IMAGE


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _md5s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _runs(project: Path, query: str = "") -> list[Any]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, query)


# ---------------------------------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------------------------------


def test_image_is_pinned_non_root_and_explains_itself(image):
    who = docker("run", "--rm", image, "sh", "-c", "id -u; python --version")
    assert who.returncode == 0, who.stderr
    assert who.stdout.split()[0] == str(UID)  # not root
    assert "Python 3.11" in who.stdout

    helped = docker("run", "--rm", image)  # no arguments: the usage
    assert helped.returncode == 0 and "docker run [options] IMAGE <stage>" in helped.stdout
    unknown = docker("run", "--rm", image, "nosuch")
    assert unknown.returncode == ExitCode.USAGE and "'nosuch' is not a stage" in unknown.stderr

    # the project's lock (constraints.txt) is what the image holds, torch included, as the CPU build
    frozen = docker("run", "--rm", image, "python", "-m", "pip", "freeze")
    assert frozen.returncode == 0, frozen.stderr
    inside = dict(line.split("==", 1) for line in frozen.stdout.splitlines() if "==" in line)
    locked = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in ("torch", "transformers", "trl", "accelerate", "mlflow", "dvc", "prefect", "great_expectations"):
        key = next(k for k in inside if k.lower().replace("-", "_") == name)
        assert inside[key].split("+")[0] == locked[next(k for k in locked if k.lower().replace("-", "_") == name)]
    assert inside[next(k for k in inside if k.lower() == "torch")].endswith("+cpu")


def test_dockerignore_keeps_the_context_small():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert ignore[0] == "*", "the context is an allow-list"
    assert not any(
        line.startswith("!") and line.rstrip("/") in (".venv", "data", "artifacts", ".git") for line in ignore
    )
    for kept in ("!stages/", "!flows/", "!pyproject.toml", "!constraints.txt"):
        assert kept in ignore


# ---------------------------------------------------------------------------------------------------------------------
# Stages in containers: `docker run IMAGE <stage>` with the workspace mounted
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path]:
    """Two copies of one tiny project: one for containers (owned by the image's user), one for local runs."""
    base = tmp_path_factory.mktemp("docker")
    boxed = make_project(base / "boxed", _overrides(PASSING))
    local = base / "local"
    shutil.copytree(boxed, local, symlinks=True)
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(boxed)], check=True)
    return boxed, local


def _stage_in_container(image: str, project: Path, stage: str) -> subprocess.CompletedProcess[str]:
    return docker(
        "run",
        "--rm",
        "-v",
        f"{project}:/workspace",
        "-e",
        "MLFLOW_TRACKING_URI=sqlite:////workspace/mlflow.db",
        image,
        stage,
    )


def test_validate_in_a_container_writes_what_a_local_run_writes(image, twins):
    boxed, local = twins
    done = _stage_in_container(image, boxed, "validate")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run([sys.executable, "-m", "stages.validate"], local)

    assert _md5s(boxed / "artifacts/validate/data") == _md5s(local / "artifacts/validate/data")
    assert json.loads((boxed / "artifacts/validate/metrics.json").read_text()) == json.loads(
        (local / "artifacts/validate/metrics.json").read_text()
    )
    # written by the image's non-root user, tracked in the mounted project's MLflow store
    assert {p.stat().st_uid for p in (boxed / "artifacts").rglob("*")} == {UID}
    [validate_run] = _runs(boxed, "tags.`rlhf.stage` = 'validate'")
    assert validate_run.info.status == "FINISHED"


def test_a_training_stage_in_a_container(image, twins):
    boxed, local = twins
    done = _stage_in_container(image, boxed, "sft")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run([sys.executable, "-m", "stages.sft"], local)

    # the same files, and the same metrics: the same code, lock and seed on the same CPU
    assert sorted(_md5s(boxed / "artifacts/sft")) == sorted(_md5s(local / "artifacts/sft"))
    boxed_metrics = json.loads((boxed / "artifacts/sft/metrics.json").read_text())
    local_metrics = json.loads((local / "artifacts/sft/metrics.json").read_text())
    assert boxed_metrics.keys() == local_metrics.keys()
    assert boxed_metrics["perplexity"] == pytest.approx(local_metrics["perplexity"], rel=1e-3)
    [sft_run] = _runs(boxed, "tags.`rlhf.stage` = 'sft'")
    assert sft_run.info.status == "FINISHED" and sft_run.data.metrics


def test_a_stage_that_fails_in_a_container_says_why(image, twins):
    boxed, _ = twins
    params = yaml.safe_load((boxed / "params.yaml").read_text())
    params["reward"]["bogus"] = 1
    broken = boxed.parent / "broken"
    shutil.copytree(boxed, broken, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    (broken / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(broken)], check=True)
    done = _stage_in_container(image, broken, "reward")
    assert done.returncode == ExitCode.BAD_INPUT
    assert "bogus" in done.stderr + done.stdout and "Traceback" not in done.stderr + done.stdout


# ---------------------------------------------------------------------------------------------------------------------
# The whole flow, each stage in its own container
# ---------------------------------------------------------------------------------------------------------------------


def test_runner_mounts_the_project_at_its_own_path(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://u:pw@127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD": "hunter2", "SECRET": "x"}
    cmd = Runner("docker", "img:tag", "all").command(tmp_path, ["dvc", "repro", "--single-item", "sft"], env)
    assert cmd[:3] == ["docker", "run", "--rm"]
    assert f"{tmp_path}:{tmp_path}" in cmd and cmd[cmd.index("-w") + 1] == str(tmp_path)
    assert cmd[cmd.index("--user") + 1] == f"{tmp_path.stat().st_uid}:{tmp_path.stat().st_gid}"
    assert cmd[cmd.index("--gpus") + 1] == "all" and "--network" in cmd  # an http tracking server on loopback
    # passed by name: docker copies the values from the environment, so no credential is in argv or the printed line
    assert "MLFLOW_TRACKING_URI" in cmd and "MLFLOW_TRACKING_PASSWORD" in cmd and "SECRET" not in " ".join(cmd)
    assert not any("hunter2" in a or "pw@" in a for a in cmd)
    assert cmd[-5:] == ["img:tag", "dvc", "repro", "--single-item", "sft"]
    assert Runner().command(tmp_path, ["dvc", "repro"], {})[1:] == ["-m", "dvc", "repro"]


def test_missing_image_is_a_clear_error(image, tmp_path):
    project = make_project(tmp_path / "p", _overrides(PASSING))
    proc = subprocess.run(
        [str(BIN / "rlhf"), "run", "--runner", "docker", "--image", "rlhf-stage:nosuch"],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == ExitCode.UNAVAILABLE and "make images" in proc.stderr and "Traceback" not in proc.stderr


def test_whole_flow_with_the_docker_runner(image, tmp_path):
    project = make_project(tmp_path / "p", _overrides(PASSING))
    root_owned = run([str(BIN / "rlhf"), "run", "--runner", "docker", "--image", image], project, check=False)
    assert root_owned.returncode == ExitCode.UNAVAILABLE and "containers never run as root" in root_owned.stderr
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(project)], check=True)  # an unprivileged owner
    proc = run([str(BIN / "rlhf"), "run", "--prefect", "--runner", "docker", "--image", image], project, timeout=1800)
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert f"ran: {', '.join(stages)};" in proc.stdout

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert list(lock) == stages
    assert (project / "artifacts/ppo/model/model.safetensors").exists()
    assert (project / "artifacts/evaluate/report.html").exists()

    [parent] = _runs(project, "tags.`rlhf.stage` = 'pipeline'")
    assert parent.data.tags["rlhf.runner"] == "docker" and parent.data.tags["rlhf.image"] == image
    assert parent.data.tags["rlhf.outcome"] == "completed" and parent.info.status == "FINISHED"
    children = _runs(project, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["rlhf.stage"] for r in children) == sorted(stages)
    for child in children:  # every stage ran in the image, in a container (its own hostname), and finished
        assert child.data.tags.get("rlhf.image") == image, child.data.tags["rlhf.stage"]
        assert child.data.tags["rlhf.host"] != os.uname().nodename
        assert child.info.status == "FINISHED"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("rlhf-policy", "champion")
    assert champion.run_id in {c.info.run_id for c in children}

    again = run([str(BIN / "rlhf"), "run", "--runner", "docker", "--image", image], project, timeout=600)
    assert "nothing new since the last run" in again.stdout  # dvc status on the host: no container is started
    assert "didn't change, skipping" not in again.stdout


@pytest.mark.stack
def test_docker_runner_reaches_the_stack(image, stack, tmp_path):
    """`--runner docker` against the stack (tests/stack_fixtures.py): each container's stage logs to the stack's MLflow
    server on the host's loopback (`--network host`), its artifacts go through the server's proxy."""
    project = make_project(tmp_path / "p", _overrides(PASSING))
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(project)], check=True)  # containers never run as root
    # its own experiment: tests/test_stack.py expects the session stack's "rlhf" experiment to start with its own runs
    proc = subprocess.run(
        [
            str(BIN / "rlhf"),
            "run",
            "--prefect",
            "--runner",
            "docker",
            "--image",
            image,
            "--stack-dir",
            str(stack.config.home),
            "sft",
        ],
        cwd=project,
        env={**env(), "MLFLOW_EXPERIMENT_NAME": "rlhf-docker"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0 and "ran: validate, sft;" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    [parent] = stack.parents("rlhf-docker")
    assert parent.info.status == "FINISHED" and parent.data.tags["rlhf.image"] == image
    assert parent.data.tags["rlhf.runner"] == "docker"
    children = stack.children(parent.info.run_id, "rlhf-docker")
    assert sorted(children) == ["sft", "validate"]
    for child in children.values():  # run in a container of the image (on the host's network: its hostname too)
        assert child.data.tags["rlhf.image"] == image
        assert child.info.status == "FINISHED" and child.info.artifact_uri.startswith("mlflow-artifacts:/")
    served = stack.mlflow.download_artifacts(children["sft"].info.run_id, "model/model.safetensors", str(tmp_path))
    assert Path(served).read_bytes() == (project / "artifacts/sft/model/model.safetensors").read_bytes()
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()


def test_docker_work_pool_deployment_runs_the_flow_in_the_image(image, tmp_path):
    """prefect.yaml's rlhf-docker deployment on a real server, served by a real Docker worker: the flow run itself
    runs in the stage image, with the checkout mounted at /workspace."""
    checkout = make_project(tmp_path / "checkout", _overrides(PASSING))
    shutil.copytree(ROOT / "flows", checkout / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "rlhf-docker"]
    # this test's image, and the host's network so the container reaches the server on loopback
    deployment["work_pool"]["job_variables"].update(image=image, network_mode="host")
    (checkout / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(checkout)], check=True)  # the image's user owns the checkout

    with prefect_server(tmp_path) as server:
        prefect_deploy(server, checkout, "rlhf-docker", "docker")
        server.start(
            [str(BIN / "prefect"), "worker", "start", "--pool", "rlhf-docker", "--type", "docker"],
            checkout,
            tmp_path / "worker.log",
        )
        triggered = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "rlhf-pipeline/rlhf-docker"],
            env=server.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        flow_run_id = flow_run_id_of(triggered)
        with temporary_settings({PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:

            def finished() -> Any:
                state = client.read_flow_run(UUID(flow_run_id)).state
                return state if state and state.is_final() else None

            state = server.wait("the flow run in the Docker work pool", finished, 900)
    # the worker keeps a flow run's container after it exits (prefect-docker's auto_remove is off by default)
    docker(
        "container",
        "rm",
        "-f",
        *docker("ps", "-aq", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}").stdout.split(),
    )
    assert state.is_completed(), f"{state.name}: {state.message}"

    [parent] = _runs(checkout, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert parent.data.tags["rlhf.outcome"] == "completed" and parent.info.status == "FINISHED"
    children = _runs(checkout, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = list(yaml.safe_load((checkout / "dvc.yaml").read_text())["stages"])
    assert sorted(r.data.tags["rlhf.stage"] for r in children) == sorted(stages)
    # the stages ran inside the flow run's container (network_mode host shares the hostname): their MLflow artifacts
    # sit under /workspace, the mount, and their outputs belong to the image's user
    assert all("/workspace/mlruns/" in r.info.artifact_uri for r in [parent, *children]), parent.info.artifact_uri
    assert (checkout / "artifacts/promote/metrics.json").stat().st_uid == UID
    assert list(yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]) == stages

"""Where a stage runs: in this environment (`local`, the default: in the flow's own process, flows/repro.py; `process`:
a process of its own) or in the stage image (`docker`, docker/Dockerfile).

Either way the stage is `dvc repro --single-item <stage>` in the project directory, so DVC decides what to skip and
dvc.lock records what ran. With `docker` the project is mounted at its own path inside the container, so every
absolute path (the SQLite tracking store, MLflow's artifact root, dvc.lock's entries) means the same inside and out,
and the container runs as the project's owner, so its outputs belong to whoever owns the checkout.

    rlhf run --runner docker                        # rlhf-stage:cpu, built by `make images`
    rlhf run --runner docker --image rlhf-stage:cuda --gpus all
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RUNNERS = ("local", "process", "docker")
DEFAULT_IMAGE = "rlhf-stage:cpu"
# What a stage reads from its environment: MLflow lineage and tracking, output buffering, thread counts.
PASSED_ENV = ("RLHF_PARENT_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PYTHONUNBUFFERED", "OMP_NUM_THREADS",
              "CUDA_VISIBLE_DEVICES")  # fmt: skip


class RunnerError(RuntimeError):
    """The runner cannot start (no Docker engine, no image): a message for the user, not a traceback."""


@dataclass(frozen=True)
class Runner:
    kind: str = "local"  # local | process | docker
    image: str = DEFAULT_IMAGE
    gpus: str | None = None  # docker --gpus (e.g. "all") for the CUDA image

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {self.kind!r}")

    def check(self) -> None:
        """Fail early, with what to do, when the docker runner cannot run."""
        if self.kind != "docker":
            return
        if not shutil.which("docker"):
            raise RunnerError("--runner docker needs the docker CLI and a running engine (see README, Containers)")
        engine = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        if engine.returncode:
            raise RunnerError(f"no Docker engine answers ({_last_line(engine.stderr)}); start one (e.g. dockerd)")
        probe = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", self.image], capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        if probe.returncode:
            raise RunnerError(f"no image {self.image!r} in the local engine: build it with `make images` "
                              f"({_last_line(probe.stderr)})")  # fmt: skip

    def command(self, project: Path, args: list[str], env: dict[str, str]) -> list[str]:
        """The command that runs `args` (a dvc or stage command line) in the project, in this runner."""
        if self.kind != "docker":
            return [sys.executable, "-m", *args] if args[0] == "dvc" else args
        return docker_run(project, self.image, args, env, self.gpus)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "no answer"


def docker_run(project: Path, image: str, args: list[str], env: dict[str, str], gpus: str | None = None) -> list[str]:
    """`docker run` of the stage image with the project mounted at its own path, as the project's owner."""
    project = project.resolve()
    owner = project.stat()
    cmd = ["docker", "run", "--rm", "--init", "-v", f"{project}:{project}", "-w", str(project),
           "--user", f"{owner.st_uid}:{owner.st_gid}"]  # fmt: skip
    if gpus:
        cmd += ["--gpus", gpus]
    if env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        cmd += ["--network", "host"]  # a tracking server on this host's loopback stays reachable
    for key in PASSED_ENV:
        if key in env:
            cmd += ["-e", f"{key}={env[key]}"]
    return [*cmd, "-e", f"RLHF_IMAGE={image}", image, *args]  # the stage's MLflow run is tagged rlhf.image

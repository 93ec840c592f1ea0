"""Where a stage runs, owned by one object: `Runner(kind).reproduce(project, stage, env, echo) -> StageResult`.

- `local` (the default): in this process. DVC's API does what `dvc repro --single-item` does (flows/dvc_adapter.py)
  and the stage's `python -m stages.X ...` runs with runpy (flows/inprocess.py), saving ~6 s of interpreter start-up
  and imports per stage. On a DVC version the adapter was not tested with, it falls back to `process` and says so.
- `process`: `dvc repro --single-item <stage>` as a process of its own (crash isolation; all of a stage's memory
  returned to the OS: the choice for large models).
- `docker`: the same command in a container of the stage image (docker/Dockerfile). The project is mounted at its own
  path, so every absolute path (the SQLite tracking store, MLflow's artifact root, dvc.lock's entries) means the same
  inside and out; the container runs as the project's owner, so its outputs belong to whoever owns the checkout.

Whichever runs it, a stage reports how it ended through a fresh outcome file (stages/lib/outcome.py), so the result's
code and reason are the stage's own, never read back from a metrics file that may be a previous run's.

    rlhf run --runner docker                        # rlhf-stage:cpu, built by `make images`
    rlhf run --runner docker --image rlhf-stage:cuda --gpus all
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flows import dvc_adapter, inprocess
from flows.inprocess import Echo, Lines
from stages.lib.outcome import OUTCOME_ENV, ExitCode, Outcome

RUNNERS = ("local", "process", "docker")
DEFAULT_IMAGE = "rlhf-stage:cpu"
OUTCOME_DIR = ".rlhf/outcomes"  # inside the project, so a container (which mounts only the project) can write there
# What a stage reads from its environment: MLflow lineage and tracking, its outcome file, buffering, thread counts.
PASSED_ENV = (
    "RLHF_PARENT_RUN_ID",
    "RLHF_LABELS_ACCEPT",  # a person's answer to a labelling round (stages/lib/label_studio.py ACCEPT_ENV)
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    OUTCOME_ENV,
)


class RunnerError(RuntimeError):
    """The runner cannot start (no Docker engine, no image): a message for the user, not a traceback."""


@dataclass
class StageResult:
    """How one stage went: `ran`, `restored` (from DVC's run cache), `skipped` (unchanged), `failed` (with the
    stage's exit code and one-line reason) or `busy` (another DVC process holds the repository lock)."""

    stage: str
    status: str
    code: int = ExitCode.OK
    reason: str = ""
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.status in ("failed", "busy")

    @property
    def message(self) -> str:
        """Why the stage ended the pipeline, in one line."""
        if self.status == "busy":
            return f"{self.stage}: another DVC process holds the lock ({self.reason})"
        kind = Outcome(self.stage, self.code).kind
        return f"stopped at {self.stage} ({kind}, exit {self.code}): {self.reason}"


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
        engine = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60
        )
        if engine.returncode:
            raise RunnerError(f"no Docker engine answers ({_last_line(engine.stderr)}); start one (e.g. dockerd)")
        probe = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", self.image],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode:
            raise RunnerError(
                f"no image {self.image!r} in the local engine: build it with `make images` ({_last_line(probe.stderr)})"
            )

    def check_project(self, project: Path) -> None:
        """Containers never run as root: the docker runner runs as the checkout's owner, so a root-owned checkout
        is refused (chown it to an unprivileged user, e.g. the image's uid 1000)."""
        if self.kind == "docker" and project.resolve().stat().st_uid == 0:
            raise RunnerError(
                f"{project.resolve()} is owned by root and containers never run as root: chown -R it to "
                "an unprivileged user (the image's user is uid 1000) and run again"
            )

    def reproduce(self, project: Path, stage: str, env: dict[str, str], echo: Echo = print) -> StageResult:
        """`dvc repro --single-item stage` where this runner says; the stage's code and reason come from the outcome
        file it writes (or, if it wrote none, from its exit code and last lines)."""
        project = project.resolve()
        outcome_file = project / OUTCOME_DIR / f"{stage}-{uuid.uuid4().hex}.json"
        outcome_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**env, OUTCOME_ENV: str(outcome_file)}
        lines, start = Lines(echo), time.monotonic()
        try:
            kind = self.kind
            if kind == "local" and (why := dvc_adapter.supported()):
                lines(f"note: running {stage} as a process of its own: {why}")
                kind = "process"
            if kind == "local":
                status, code = _in_process(project, stage, env, lines)
            else:
                self.check_project(project)
                _share_with_owner(project)
                status, code = _in_subprocess(
                    self.command(project, ["dvc", "repro", "--single-item", stage], env), project, env, lines
                )
            written = Outcome.read(outcome_file)
        finally:
            outcome_file.unlink(missing_ok=True)
        seconds, tail = round(time.monotonic() - start, 1), list(lines.tail)
        if status == "failed" and written is not None and written.code:
            return StageResult(stage, status, written.code, written.reason, seconds, tail)
        if status == "failed":  # no outcome: DVC itself failed, or the stage died before reporting
            return StageResult(stage, status, code or ExitCode.CRASH, _last_error(tail), seconds, tail)
        if status == "busy":
            return StageResult(stage, status, ExitCode.BUSY, _last_error(tail), seconds, tail)
        return StageResult(stage, status, ExitCode.OK, "", seconds, tail)

    def command(self, project: Path, args: list[str], env: dict[str, str]) -> list[str]:
        """The command that runs `args` (a dvc or stage command line) in the project, in this runner."""
        if self.kind != "docker":
            return [sys.executable, "-m", *args] if args[0] == "dvc" else args
        return docker_run(project, self.image, args, env, self.gpus)


def _in_process(project: Path, stage: str, env: dict[str, str], lines: Lines) -> tuple[str, int]:
    """The local runner: DVC's API, and each `python -m` command in this process (anything else in DVC's shell)."""

    def run(cmd: str, cwd: str, cmd_env: dict[str, str]) -> int:
        if module := inprocess.python_module(cmd):
            lines(f"> {cmd}   (in this process)")
            return inprocess.run_module(module[0], module[1:], cwd, cmd_env, lines)
        lines(f"> {cmd}")
        return inprocess.run_command(dvc_adapter.shell_argv(cmd), cwd, cmd_env, lines)

    try:
        with inprocess.one_at_a_time():
            return dvc_adapter.reproduce(project, stage, run, env, lines), ExitCode.OK
    except dvc_adapter.Busy as e:
        lines(f"ERROR: {e}")
        return "busy", ExitCode.BUSY
    except dvc_adapter.CommandFailed as e:
        return "failed", e.code
    except dvc_adapter.DvcFailed as e:
        lines(f"ERROR: {e}")
        return "failed", ExitCode.CRASH
    except Exception as e:  # noqa: BLE001 (opening the repository: permissions, a broken index): say what
        lines(f"ERROR: {type(e).__name__}: {e}")
        return "failed", ExitCode.CRASH


def _in_subprocess(cmd: list[str], project: Path, env: dict[str, str], lines: Lines) -> tuple[str, int]:
    """A `dvc repro --single-item <stage>` command line (here, or `docker run ... dvc repro ...`) as a new process;
    what DVC printed tells skipped, restored and busy apart."""
    lines(f"$ {' '.join(cmd)}")
    code = inprocess.run_command(cmd, str(project), env, lines)
    output = "\n".join(lines.tail)
    if code == 0:
        skipped, restored = "didn't change, skipping" in output, "is cached - skipping run" in output
        return ("skipped" if skipped else "restored" if restored else "ran"), ExitCode.OK
    if "Unable to acquire lock" in output and "Running stage" not in output:  # nothing ran: safe to retry
        return "busy", code
    exited = re.findall(r"failed to run: .*, exited with (-?\d+)", output)
    return "failed", int(exited[-1]) if exited else code


def _share_with_owner(project: Path) -> None:
    """What this (root) process made in the project that a container writes to as the checkout's owner: the MLflow
    store and artifact root, and the outcome files' folder. Without root, the files are the owner's already."""
    if os.geteuid() != 0:
        return
    owner = project.stat()
    for name in ("mlflow.db", "mlruns", ".rlhf"):
        top = project / name
        for path in [top, *(top.rglob("*") if top.is_dir() else [])]:
            if path.exists() and path.stat().st_uid != owner.st_uid:
                os.chown(path, owner.st_uid, owner.st_gid)


def _last_error(tail: list[str], n: int = 3) -> str:
    """Why a stage that wrote no outcome failed: DVC's own error when DVC failed (a missing output, no such stage),
    else the last lines the command printed before DVC's "failed to run" line."""
    errors = [ln for ln in tail if ln.startswith("ERROR: ")]
    if errors and "failed to run:" not in errors[-1]:
        return errors[-1].removeprefix("ERROR: ")
    kept = [ln.strip() for ln in tail if not ln.startswith("ERROR: ")]
    return " | ".join(kept[-n:]) or "no output"


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "no answer"


def docker_run(project: Path, image: str, args: list[str], env: dict[str, str], gpus: str | None = None) -> list[str]:
    """`docker run` of the stage image with the project mounted at its own path, as the project's owner."""
    project = project.resolve()
    owner = project.stat()
    cmd = [
        "docker",
        "run",
        "--rm",
        "--init",
        "-v",
        f"{project}:{project}",
        "-w",
        str(project),
        "--user",
        f"{owner.st_uid}:{owner.st_gid}",
    ]
    if gpus:
        cmd += ["--gpus", gpus]
    if env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        cmd += ["--network", "host"]  # a tracking server on this host's loopback stays reachable
    # `-e NAME` without a value: docker copies the value from the environment the command runs in (ours), so no
    # credential appears in the printed command line or in the process list
    for key in PASSED_ENV:
        if key in env:
            cmd += ["-e", key]
    return [*cmd, "-e", f"RLHF_IMAGE={image}", image, *args]  # the stage's MLflow run is tagged rlhf.image

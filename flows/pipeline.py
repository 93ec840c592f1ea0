"""The pipeline as a Prefect flow that follows dvc.yaml: one task per DVC stage, each run as `dvc repro --single-item`
(by default in the flow's own process, flows/repro.py; `runner="process"` or `"docker"` gives each stage a process or a
container of its own).

There is no second list of stages: `plan()` reads the `stages` of dvc.yaml in file order (which is topological) and
DVC decides what to skip. The flow adds what DVC lacks: one parent MLflow run per pipeline run (each stage's run nests
under it through `RLHF_PARENT_RUN_ID`; stages/tracking.py), a failed flow whose message is the gate's reason, and
Prefect artifacts (validation summary, reward gate, PPO KL curve, evaluation report).

    rlhf run --prefect              # this flow, in-process (a temporary Prefect server when PREFECT_API_URL is unset)
    rlhf serve --cron "0 3 * * *"   # this flow as the deployment rlhf-pipeline/rlhf-nightly
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import Failed, State

from flows import repro
from flows.cli import EXIT_GATE, venv_env
from flows.containers import DEFAULT_IMAGE, Runner
from stages.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI

FLOW_NAME = "rlhf-pipeline"
PARENT_STAGE_TAG = "pipeline"  # the parent run's `rlhf.stage`: one pipeline run, one child run per stage
LOCAL = Runner()  # stages run in this environment unless the flow is asked for containers
STOPPED, BUSY = "Stopped", "DvcBusy"  # names of the Failed states a stage task returns for a gate / a held DVC lock
MAX_ARTIFACT_CHARS = 20_000


@dataclass(frozen=True)
class StageResult:
    """What one stage did: `ran`, `skipped` (DVC found nothing changed) or `restored` (from DVC's run cache)."""

    stage: str
    status: str
    seconds: float


# ---------------------------------------------------------------------------------------------------------------------
# The plan: dvc.yaml's stages, nothing else
# ---------------------------------------------------------------------------------------------------------------------


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (entries are `path` or `{path: options}`)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def plan(project_dir: str | Path = ".", targets: list[str] | None = None) -> list[str]:
    """The stages of dvc.yaml in file order; with `targets`, only those and the stages they depend on."""
    stages: dict[str, dict[str, Any]] = yaml.safe_load((Path(project_dir) / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        if "foreach" in spec or "matrix" in spec:
            raise ValueError(f"dvc.yaml stage {name!r} uses foreach/matrix, which the flow does not expand")
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    upstream = {n: {m for m in stages if m != n and any(_overlaps(d, o) for d in _paths(s.get("deps"))
                                                         for o in outs[m])}
                for n, s in stages.items()}  # fmt: skip
    names = list(stages)
    for n in names:  # file order must be topological: `dvc repro --single-item` runs exactly one stage
        if later := [m for m in upstream[n] if names.index(m) > names.index(n)]:
            raise ValueError(f"dvc.yaml lists stage {n!r} before {later[0]!r}, which it depends on")
    if not targets:
        return names
    unknown = set(targets) - set(names)
    if unknown:
        raise ValueError(f"no such stage in dvc.yaml: {', '.join(sorted(unknown))} (stages: {', '.join(names)})")
    wanted, todo = set(), list(targets)
    while todo:
        if (n := todo.pop()) not in wanted:
            wanted.add(n)
            todo.extend(upstream[n])
    return [n for n in names if n in wanted]


# ---------------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE)
def ensure_data(project_dir: str, params: str = "params.yaml", data: str = "data") -> bool:
    """Generate the embedded default task into data/ when it is missing (it matches data.dvc); True if generated."""
    project = Path(project_dir)
    if (project / data).exists():
        return False
    from stages import task as default_task

    get_run_logger().info("no %s/ found: generating the embedded default task (it matches data.dvc)", data)
    rc = default_task.main(["--params", str(project / params), "--out", str(project / data)])
    if rc:
        raise RuntimeError(f"generating {data}/ failed (exit {rc})")
    return True


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def open_parent_run(tracking_uri: str, experiment: str, artifact_root: str | None, tags: dict[str, str]) -> str:
    """Open the pipeline's parent MLflow run (each stage's run nests under it); returns its run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    # A sqlite store puts a new experiment's artifacts under ./mlruns of the *current* directory: pin the project's.
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_root)
    return client.create_run(experiment_id, tags=tags, run_name=PARENT_STAGE_TAG).info.run_id


def _retry_only_when_busy(_task: Any, _task_run: TaskRun, state: State) -> bool:
    """Retry a stage only when another DVC process held the lock; never a gate (exit 2) or a crash."""
    return state.name == BUSY


@task(retries=3, retry_delay_seconds=15, retry_condition_fn=_retry_only_when_busy, cache_policy=NO_CACHE,
      task_run_name="{stage}")  # fmt: skip
def run_stage(stage: str, project_dir: str, parent_run_id: str, tracking_uri: str,
              runner: Runner = LOCAL) -> StageResult | State:  # fmt: skip
    """Run one dvc.yaml stage as `dvc repro --single-item` would: DVC skips it when nothing it depends on changed.

    The local runner runs it in this process (flows/repro.py: no interpreter and imports to pay per stage); `process`
    runs `dvc repro --single-item` as a new process, `docker` in the stage image."""
    env = {**venv_env(), "RLHF_PARENT_RUN_ID": parent_run_id, "MLFLOW_TRACKING_URI": tracking_uri,
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    start = time.monotonic()
    outcome = repro.reproduce(runner, Path(project_dir), stage, env, get_run_logger().info)
    seconds = round(time.monotonic() - start, 1)
    if outcome.status not in ("busy", "failed"):
        return StageResult(stage, outcome.status, seconds)
    name = BUSY if outcome.status == "busy" else STOPPED if outcome.code == EXIT_GATE else "Failed"
    return Failed(name=name, message=stop_message(Path(project_dir), stage, outcome))


def stop_message(project: Path, stage: str, outcome: repro.Outcome) -> str:
    """Why a stage ended the pipeline, in one line: a held DVC lock, a gate (the reason in its metrics) or a crash."""
    if outcome.status == "busy":
        return f"{stage}: another DVC process holds the lock"
    if outcome.code == EXIT_GATE:
        return f"stopped at {stage}: {gate_reason(project, stage, outcome.tail)}"
    return f"{stage} crashed (exit {outcome.code}): " + " | ".join(_error_lines(outcome.tail))


def _error_lines(tail: list[str], n: int = 3) -> list[str]:
    """The last lines a stage printed before DVC's own ERROR line."""
    lines = [ln for ln in tail if not ln.startswith("ERROR: failed to reproduce")]
    return [ln.strip() for ln in lines[-n:]] or ["no output"]


def gate_reason(project: Path, stage: str, tail: list[str] | tuple[str, ...] = ()) -> str:
    """The gate's sentence from the stage's metrics (`gate.reason` or `reason`), else its last output line."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]
    for path in _paths(spec.get("metrics")):
        try:
            metrics = json.loads((project / path).read_text())
        except (OSError, ValueError):
            continue
        gate = metrics.get("gate")
        if isinstance(gate, dict) and gate.get("reason") and not gate.get("passed", False):
            return str(gate["reason"])
        if metrics.get("reason") and metrics.get("outcome") not in (None, "completed"):
            return f"{metrics['outcome']}: {metrics['reason']}" if metrics.get("outcome") else str(metrics["reason"])
    return _error_lines(list(tail), 1)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Lineage: git, data and DVC hashes on the parent run
# ---------------------------------------------------------------------------------------------------------------------


def tracking_uri_for(project: Path) -> str:
    """MLFLOW_TRACKING_URI, else the project's own sqlite:///mlflow.db (absolute, so any working directory works)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    return f"sqlite:///{project / 'mlflow.db'}" if uri == DEFAULT_TRACKING_URI else uri


def git_commit(project: Path) -> str | None:
    """HEAD of the project's git repository, with `-dirty` when tracked files changed; None without commits."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, timeout=30)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project,
                               capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def data_hash(project: Path) -> str | None:
    """The md5 that data.dvc records for the raw data."""
    try:
        return str(yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError):
        return None


def stage_hash(project: Path, stage: str) -> str | None:
    """An md5 of the stage's dvc.lock entry (command, dependencies, params and outputs with their hashes)."""
    try:
        entry = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]
    except (OSError, KeyError, TypeError):
        return None
    return hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def lineage_tags(project: Path, stages: list[str]) -> dict[str, str]:
    """What the parent run was made from: the git commit, the raw data's hash, the planned stages."""
    tags = {"rlhf.stage": PARENT_STAGE_TAG, "rlhf.stages": ",".join(stages)}
    if commit := git_commit(project):
        tags |= {"rlhf.git_commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")}
    if md5 := data_hash(project):
        tags["rlhf.data_md5"] = md5
    return tags


def _tag_parent(tracking_uri: str, run_id: str, tags: dict[str, str], status: str | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value[:5000])
    if status:
        client.set_terminated(run_id, status)


def _log_seconds(tracking_uri: str, run_id: str, result: StageResult) -> None:
    """The stage's wall time in the flow (`dvc repro --single-item`, start-up included) as `seconds.<stage>`."""
    import mlflow

    mlflow.MlflowClient(tracking_uri=tracking_uri).log_metric(run_id, f"seconds.{result.stage}", result.seconds)


# ---------------------------------------------------------------------------------------------------------------------
# Prefect artifacts: what a reader of the flow run wants to see without opening files
# ---------------------------------------------------------------------------------------------------------------------


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ARTIFACT_CHARS else text[:MAX_ARTIFACT_CHARS] + "\n\n... (truncated)"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def publish_validation(project: Path) -> str | None:
    path = project / "reports/validate/report.md"
    if not path.exists():
        return None
    text = _truncate(path.read_text(encoding="utf-8", errors="replace"))
    if not re.search(r"^(#|\|)", text, re.M):  # the report is plain text: keep its layout
        text = f"```text\n{text}\n```"
    create_markdown_artifact(f"# Data validation\n\n{text}", key="validation-summary",
                             description=str(path.relative_to(project)))  # fmt: skip
    return "validation-summary"


def publish_reward_gate(project: Path) -> str | None:
    metrics = _read_json(project / "artifacts/reward/metrics.json")
    if not metrics:
        return None
    gate = metrics.get("gate", {})
    rows = [{"metric": k, "value": round(v, 4) if isinstance(v, float) else v} for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]  # fmt: skip
    rows.insert(0, {"metric": "gate", "value": gate.get("reason", "")})
    create_table_artifact(rows, key="reward-gate", description=gate.get("reason", "reward-model gate"))
    return "reward-gate"


def publish_ppo(project: Path, max_rows: int = 20) -> str | None:
    import csv

    path = project / "artifacts/ppo/kl.csv"
    if not path.exists():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in ("step", "objective/kl", "objective/kl_k3", "objective/scores", "objective/rlhf_reward",
                           "policy/approxkl_avg") if rows and c in rows[0]]  # fmt: skip
    every = max(1, math.ceil(len(rows) / max_rows))
    shown = rows[::every] + ([rows[-1]] if rows and (len(rows) - 1) % every else [])
    metrics = _read_json(project / "artifacts/ppo/metrics.json") or {}
    lines = [f"**outcome**: {metrics.get('outcome', '?')}: {metrics.get('reason', '')}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]  # fmt: skip
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in shown]
    create_markdown_artifact("# PPO: KL to the reference and scores\n\n" + "\n".join(lines), key="ppo-kl",
                             description=f"artifacts/ppo/kl.csv, every {every} step(s)")  # fmt: skip
    return "ppo-kl"


def publish_evaluation(project: Path) -> str | None:
    path = project / "artifacts/evaluate/report.md"
    if not path.exists():
        return None
    create_markdown_artifact(_truncate(path.read_text(encoding="utf-8", errors="replace")), key="evaluation-report",
                             description="artifacts/evaluate/report.md")  # fmt: skip
    return "evaluation-report"


# Optional per-stage reports; a stage without one runs all the same (the plan comes from dvc.yaml alone).
PUBLISHERS: dict[str, Callable[[Path], str | None]] = {
    "validate": publish_validation, "reward": publish_reward_gate, "ppo": publish_ppo, "evaluate": publish_evaluation,
}  # fmt: skip


def promotion(project: Path) -> dict[str, Any] | None:
    """The promote stage's verdict (artifacts/promote/metrics.json), if that stage has run."""
    return _read_json(project / "artifacts/promote/metrics.json")


# ---------------------------------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------------------------------


@flow(name=FLOW_NAME)
def rlhf_pipeline(project_dir: str = ".", stages: list[str] | None = None, params: str = "params.yaml",
                  runner: str = "local", image: str = DEFAULT_IMAGE, gpus: str | None = None) -> dict[str, Any] | State:
    """Run dvc.yaml's stages in order, each as a task; stop with a Failed state naming the stage when a gate fails.

    `runner="docker"` runs each stage in its own container of `image` (`make images`), with `gpus` passed to
    `docker run --gpus` (e.g. "all" for the CUDA image); the default runs them in this environment."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    project = Path(project_dir).resolve()
    names = plan(project, stages)
    where = Runner(runner, image, gpus)
    where.check()
    ensure_data(str(project), params)

    tracking_uri = tracking_uri_for(project)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    artifact_root = str(project / "mlruns" / experiment) if tracking_uri.startswith("sqlite:") else None
    tags = lineage_tags(project, names) | {"prefect.flow_run_id": str(flow_run.id),
                                           "prefect.flow_run_name": str(flow_run.name), "rlhf.runner": runner}  # fmt: skip
    if runner == "docker":
        tags["rlhf.image"] = image
    parent_run_id = open_parent_run(tracking_uri, experiment, artifact_root, tags)
    logger.info("MLflow parent run %s (%s, experiment %r)", parent_run_id, tracking_uri, experiment)

    summary: dict[str, Any] = {"project_dir": str(project), "parent_run_id": parent_run_id,
                               "tracking_uri": tracking_uri, "plan": names, "ran": [], "skipped": [], "restored": [],
                               "stages": {}, "artifacts": []}  # fmt: skip
    status = "FAILED"
    try:
        for stage in names:
            state = run_stage(stage, str(project), parent_run_id, tracking_uri, where, return_state=True)
            stopped = state.is_failed() and state.name == STOPPED
            publish = PUBLISHERS.get(stage)  # a gate's report says why it stopped: publish it then too
            if publish and (not state.is_failed() or stopped) and (key := publish(project)):
                summary["artifacts"].append(key)
            if state.is_failed():
                _tag_parent(tracking_uri, parent_run_id, {"rlhf.outcome": "stopped" if stopped else "crashed",
                                                          "rlhf.stopped_at": stage, "rlhf.reason": state.message or ""})
                return Failed(name=STOPPED if stopped else "Failed", message=state.message)
            result: StageResult = state.result()
            summary["stages"][stage] = asdict(result)
            summary[result.status].append(stage)
            if digest := stage_hash(project, stage):
                _tag_parent(tracking_uri, parent_run_id, {f"dvc.stage.{stage}": digest})
            _log_seconds(tracking_uri, parent_run_id, result)
        summary["promotion"] = promotion(project) if "promote" in names else None
        _tag_parent(tracking_uri, parent_run_id, {"rlhf.outcome": "completed",
                                                  "rlhf.ran": ",".join(summary["ran"]) or "-"})  # fmt: skip
        status = "FINISHED"
        logger.info("ran %s; skipped %s; restored from the run cache %s", summary["ran"] or "nothing",
                    summary["skipped"] or "nothing", summary["restored"] or "nothing")  # fmt: skip
        return summary
    finally:
        _tag_parent(tracking_uri, parent_run_id, {}, status=status)

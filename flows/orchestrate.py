"""The one orchestration loop: dvc.yaml's stages in order, each reproduced where the runner says, stopping at the
first stage that fails. `rlhf run` calls it directly; the Prefect flow calls it with each stage as a task and hooks
for its parent MLflow run and artifacts (flows/pipeline.py).

There is no second list of stages: `plan()` reads the `stages` of dvc.yaml in file order (which must be topological)
and DVC decides what to skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.runners import Runner, StageResult
from stages.lib.environment import quiet
from stages.lib.outcome import BadInput, Busy, ExitCode

DATA_DIR = "data"  # the raw data, tracked by data.dvc


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (entries are `path` or `{path: options}`)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def dvc_stages(project: str | Path = ".") -> dict[str, dict[str, Any]]:
    """The `stages` of the project's dvc.yaml, in file order."""
    path = Path(project) / "dvc.yaml"
    if not path.exists():
        raise BadInput(f"no dvc.yaml in {Path(project).resolve()}: run rlhf from the project's directory")
    return yaml.safe_load(path.read_text())["stages"]


def plan(project: str | Path = ".", targets: list[str] | None = None) -> list[str]:
    """The stages of dvc.yaml in file order; with `targets`, only those and the stages they depend on."""
    stages = dvc_stages(project)
    for name, spec in stages.items():
        if "foreach" in spec or "matrix" in spec:
            raise ValueError(f"dvc.yaml stage {name!r} uses foreach/matrix, which the flow does not expand")
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    upstream = {
        n: {m for m in stages if m != n and any(_overlaps(d, o) for d in _paths(s.get("deps")) for o in outs[m])}
        for n, s in stages.items()
    }
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


def ensure_data(project: Path, echo: Callable[[str], None] = print) -> bool:
    """Generate the embedded default task into data/ when it is missing (it matches data.dvc), and see that data/ is
    in the DVC cache (so `dvc push` sends it to a teammate); True if generated."""
    generated = False
    if not (project / DATA_DIR).exists() and (project / "params.yaml").exists():
        from stages.lib import task

        echo(f"no {DATA_DIR}/ found: generating the embedded default task (it matches data.dvc)")
        code = task.main(["--params", str(project / "params.yaml"), "--out", str(project / DATA_DIR)])
        if code:
            raise RuntimeError(f"generating {DATA_DIR}/ failed (exit {code})")
        generated = True
    cache_data(project, echo)
    return generated


def data_hash(project: Path) -> str | None:
    """The md5 that data.dvc records for the raw data."""
    try:
        return str(yaml.safe_load((project / f"{DATA_DIR}.dvc").read_text())["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError):
        return None


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This interpreter's `dvc` with `args` in `project`, in a stage's environment, its output captured."""
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc), *args], cwd=project, capture_output=True, text=True, env=stage_env())


def cache_data(project: Path, echo: Callable[[str], None] = print) -> bool:
    """`dvc commit data.dvc`: data/ as it is now becomes data.dvc's version, in the DVC cache. A fresh clone that
    generated data/ gets it cached (without it, `dvc push` has nothing to send and a teammate's `dvc pull` reports
    data/ missing); data/ that changed since data.dvc (a new batch of labelled pairs in data/incoming/, an edited file,
    the task section changed) is committed as a new version, which every stage downstream of it then retrains on.
    True when data.dvc changed (git shows it; commit it so teammates get the same data)."""
    dvc_file = project / f"{DATA_DIR}.dvc"
    if not (project / DATA_DIR).is_dir() or not dvc_file.exists() or not (project / ".dvc").is_dir():
        return False
    before, md5_before = dvc_file.read_text(), data_hash(project) or ""
    done = _dvc(project, "commit", "--force", "--quiet", dvc_file.name)
    if done.returncode and "Unable to acquire lock" in done.stderr + done.stdout:  # a `dvc` command of yours runs
        raise Busy(f"dvc commit {dvc_file.name}: another DVC command holds the project's lock (.dvc/tmp/lock); nothing "
                   "ran, run again when it ends")  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"dvc commit {dvc_file.name} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    if dvc_file.read_text() == before:
        return False
    md5_after = data_hash(project) or ""
    echo(f"new data: {DATA_DIR}/ changed since {dvc_file.name} (md5 {md5_before[:8]} -> {md5_after[:8]}): committed as "
         f"a new version, the stages that read it run again; commit {dvc_file.name} to git so teammates "
         "get it")  # fmt: skip
    return True


def up_to_date(project: Path, names: list[str]) -> str | None:
    """One line saying there is nothing new when `dvc status` finds every stage of `names` up to date (no data, param
    or code change since dvc.lock, every output in place); None when something would run."""
    done = _dvc(project, "status", "--json", *names)
    try:
        changed = json.loads(done.stdout or "null") if done.returncode == 0 else None
    except json.JSONDecodeError:
        changed = None
    if changed != {}:
        return None
    return (f"nothing new since the last run: data (data.dvc {(data_hash(project) or '-')[:8]}), params and code are "
            f"as dvc.lock recorded them; all {len(names)} stages up to date, nothing ran")  # fmt: skip


def tracking_uri_for(project: Path) -> str:
    """MLFLOW_TRACKING_URI, else the project's own sqlite:///mlflow.db (absolute, so any working directory works)."""
    from stages.lib.tracking import DEFAULT_TRACKING_URI, tracking_uri

    uri = tracking_uri()
    return f"sqlite:///{project / 'mlflow.db'}" if uri == DEFAULT_TRACKING_URI else uri


def prepare(project: Path, echo: Callable[[str], None] = print) -> None:
    """Before a pipeline run: the default task's data if there is none, an empty labels file where params.yaml names
    one that is not there yet (flows/labelling.py), dvc.yaml in sync (flows/sync.py), and the
    MLflow runs a killed earlier run left RUNNING ended KILLED (flows/lifecycle.py)."""
    from flows.labelling import ensure_labels_file
    from flows.lifecycle import close_dead_runs
    from flows.sync import sync
    from stages.lib.params import load_params
    from stages.lib.tracking import DEFAULT_EXPERIMENT

    ensure_data(project, echo)
    if (project / "params.yaml").exists():  # a project of stages that read no params has none
        ensure_labels_file(project, load_params(project / "params.yaml"), echo)
    for line in sync(project):
        echo(f"dvc.yaml now: {line}")
    uri = tracking_uri_for(project)
    if not uri.startswith("sqlite:") or (project / "mlflow.db").exists():  # nothing to close in a store not yet made
        closed = close_dead_runs(uri, os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        if closed:
            echo(f"ended {len(closed)} MLflow run(s) a killed run had left RUNNING: {', '.join(closed)}")


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage's command: this interpreter's bin/ first on PATH (so `python` and `dvc` in a
    command are ours), telemetry off, unbuffered output, plus `extra`."""
    env = quiet(dict(os.environ))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


@dataclass
class PipelineResult:
    """What a pipeline run did: each stage's result in order, and the stage that stopped it (if one did)."""

    results: list[StageResult] = field(default_factory=list)

    @property
    def stopped(self) -> StageResult | None:
        return next((r for r in self.results if r.stopped), None)

    @property
    def exit_code(self) -> int:
        """The stopping stage's code in the one vocabulary (stages/lib/outcome.py); busy is EX_TEMPFAIL-like."""
        stop = self.stopped
        if stop is None:
            return ExitCode.OK
        return ExitCode.BUSY if stop.status == "busy" else stop.code

    def names(self, status: str) -> list[str]:
        return [r.stage for r in self.results if r.status == status]

    def summary(self) -> str:
        restored = (
            f"; restored from DVC's run cache: {', '.join(self.names('restored'))}" if self.names("restored") else ""
        )
        return (
            f"ran: {', '.join(self.names('ran')) or 'nothing'}; skipped (unchanged): "
            f"{', '.join(self.names('skipped')) or 'nothing'}{restored}"
        )


Execute = Callable[[str], StageResult]


def run_pipeline(
    project: Path, names: list[str], execute: Execute, after: Callable[[StageResult], None] | None = None
) -> PipelineResult:
    """Run `names` (a plan) in order with `execute(stage)`, calling `after(result)` for each; stop at the first
    stage that fails or finds DVC busy."""
    pipeline = PipelineResult()
    for stage in names:
        result = execute(stage)
        pipeline.results.append(result)
        if after is not None:
            after(result)
        if result.stopped:
            break
    return pipeline


def local_execute(runner: Runner, project: Path, env: dict[str, str], echo: Callable[[str], None]) -> Execute:
    """`execute` for `rlhf run`: each stage reproduced by `runner`, its output to `echo`."""
    return lambda stage: runner.reproduce(project, stage, env, echo)

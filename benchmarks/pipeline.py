"""Time the whole default pipeline the way `make run` runs it, and the share spent outside stage compute.

    .venv/bin/python benchmarks/pipeline.py            # a fresh clone of HEAD in a temp dir: every stage runs
    .venv/bin/python benchmarks/pipeline.py --runner process   # each stage a process of its own (the old default)
    .venv/bin/python benchmarks/pipeline.py --project .         # this checkout as it is (unchanged stages skip)

What it measures (all wall-clock, on whatever else the machine is doing: check the load average it records):
- `wall`: `rlhf run --prefect` end to end (what `make run` runs once the venv exists), temporary Prefect server
  included;
- per stage, `stage`: the flow task's `dvc repro --single-item` (in the flow's process with the default runner, a
  subprocess with `--runner process`; the parent MLflow run's `seconds.<stage>`), and `compute`: the stage's own MLflow
  run, from its start to its end (its training and evaluation work);
- `overhead` = wall - sum(compute), split into Prefect (wall - sum(stage): server start, the CLI's own imports, flow
  and task bookkeeping, artifacts) and stage start-up (sum(stage) - sum(compute): interpreter start and imports where a
  stage has a process of its own, imports done on first use in process, DVC hashing and locking, MLflow set-up);
- a second `rlhf run --prefect` (every stage skipped) and a no-op `dvc repro` (median of 3).
Writes benchmarks/pipeline_results.json (pipeline_results_process.json for `--runner process`). The fresh clone uses
this interpreter's environment, so run it from a clean checkout: the code imported is this checkout's, the code DVC
hashes is the clone's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from stages.lib.environment import QUIET as QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_TRACKING_URI", "RLHF_PARENT_RUN_ID", "PREFECT_API_URL"):
        env.pop(key, None)
    return env


def _timed(cmd: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc


def stage_times(project: Path) -> dict[str, dict[str, float]]:
    """Per stage of the latest pipeline run: the flow's subprocess seconds and the stage's MLflow run duration."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    [parent] = client.search_runs(
        experiments, "tags.`rlhf.stage` = 'pipeline'", order_by=["start_time DESC"], max_results=1
    )
    children = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    out: dict[str, dict[str, float]] = {}
    for child in children:
        stage = child.data.tags["rlhf.stage"]
        out[stage] = {
            "stage": parent.data.metrics.get(f"seconds.{stage}", float("nan")),
            "compute": (child.info.end_time - child.info.start_time) / 1000,
        }
    return out


def output_hashes(project: Path) -> dict[str, dict[str, str]]:
    """dvc.lock's md5 of every stage output, to compare runs (and runners) output by output."""
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {stage: {o["path"]: o["md5"] for o in entry.get("outs", [])} for stage, entry in lock.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=None, help="run here instead of a fresh clone of HEAD")
    parser.add_argument(
        "--runner",
        choices=["local", "process"],
        default="local",
        help="local: stages in the flow's process (the default); process: one process per stage",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/pipeline_results[_process].json")
    args = parser.parse_args(argv)
    out = args.out or ROOT / f"benchmarks/pipeline_results{'_process' if args.runner == 'process' else ''}.json"

    tmp = None
    if args.project is None:
        tmp = Path(tempfile.mkdtemp(prefix="rlhf-pipeline-bench-"))
        project = tmp / "project"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    else:
        project = args.project.resolve()
    try:
        load_before = os.getloadavg()
        rlhf = [str(BIN / "rlhf"), "run", "--prefect", "--runner", args.runner]
        wall, first = _timed(rlhf, project)
        stages = stage_times(project)
        hashes = output_hashes(project)
        compute = sum(s["compute"] for s in stages.values())
        in_stages = sum(s["stage"] for s in stages.values())
        noop_flow, second = _timed(rlhf, project)
        noop_dvc = statistics.median(_timed([str(BIN / "dvc"), "repro"], project)[0] for _ in range(3))
        result = {
            "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}",
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "project": "fresh clone of HEAD" if tmp else str(project),
            "runner": args.runner,
            "wall_s": round(wall, 1),
            "stage_compute_s": round(compute, 1),
            "stage_processes_s": round(in_stages, 1),
            "overhead_s": round(wall - compute, 1),
            "overhead_pct_of_compute": round(100 * (wall - compute) / compute, 1),
            "prefect_s": round(wall - in_stages, 1),
            "stage_startup_s": round(in_stages - compute, 1),
            "stages": {k: {m: round(v, 1) for m, v in s.items()} for k, s in stages.items()},
            "noop_flow_s": round(noop_flow, 1),
            "noop_dvc_repro_s": round(noop_dvc, 2),
            "ran": first.stdout.strip().splitlines()[-4:],
            "second_run": [ln for ln in second.stdout.splitlines() if ln.startswith("ran:")],
            "output_md5": hashes,
        }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'stage':<10} {'stage s':>8} {'compute s':>10}")
    for name, s in result["stages"].items():
        print(f"{name:<10} {s['stage']:>8} {s['compute']:>10}")
    print(
        f"wall {result['wall_s']} s; stage compute {result['stage_compute_s']} s; overhead {result['overhead_s']} s "
        f"({result['overhead_pct_of_compute']}% of compute: Prefect {result['prefect_s']} s, stage start-up "
        f"{result['stage_startup_s']} s); no-op flow {result['noop_flow_s']} s; no-op dvc repro "
        f"{result['noop_dvc_repro_s']} s; load {result['loadavg_before']} -> {result['loadavg_after']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

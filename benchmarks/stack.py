"""The cost of the stack: `rlhf stack up` from nothing, and the same pipeline embedded and against the stack.

    .venv/bin/python benchmarks/stack.py                 # the tiny pipeline of the tests (seconds per stage)
    .venv/bin/python benchmarks/stack.py --default       # the default pipeline of `make run` (minutes)

Each pipeline runs from a fresh copy of the project (every stage runs): once embedded (`rlhf run --prefect`: SQLite
tracking, Prefect's temporary server) and once against a stack started for the purpose (`rlhf run --prefect --stack`),
in that order, on whatever else the machine is doing (the load average is recorded). The stack is started in a fresh
folder on free loopback ports, so the start-up includes initdb and both servers' database migrations, and stopped at
the end. Writes benchmarks/stack_results.json (stack_results_default.json with --default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tests.helpers import deep_merge, make_project  # noqa: E402 (the tests' throw-away copy of the project)
from tests.stack_fixtures import PASSING, free_ports  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return round(time.monotonic() - t0, 1)


def project(dest: Path, overrides: dict, default: bool) -> Path:
    """A fresh copy of the project: the tests' tiny sizes, or params.yaml's defaults (the gates opened either way)."""
    make_project(dest, overrides, data=False)
    if default:
        params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in ([str(BIN / "rlhf"), "make-data"], [sys.executable, "-m", "dvc", "add", "-q", "data"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--default", action="store_true", help="the default pipeline (make run's) instead of the tiny one"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-stack-bench-"))
    work.chmod(0o755)  # the stack's service user reaches its folders through this one
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PREFECT_HOME": str(work / "prefect-home")}
    overrides = {"reward_gate": PASSING["reward_gate"], "promote": PASSING["promote"]} if args.default else PASSING
    stack_dir = work / "stack"
    pg, prefect, ml, ssh = free_ports(4)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "pipeline": "default" if args.default else "tiny (tests/stack_fixtures.py PASSING)",
    }
    try:
        result["load_before"] = os.getloadavg()
        embedded = project(work / "embedded", overrides, args.default)
        result["pipeline_embedded_s"] = timed([str(BIN / "rlhf"), "run", "--prefect"], embedded, env)
        result["stack_up_from_nothing_s"] = timed(
            [
                str(BIN / "rlhf"),
                "stack",
                "up",
                "--dir",
                str(stack_dir),
                "--pg-port",
                str(pg),
                "--prefect-port",
                str(prefect),
                "--mlflow-port",
                str(ml),
                "--ssh-port",
                str(ssh),
                "--no-deploy",
            ],
            work,
            env,
        )
        result["stack_up_again_s"] = timed(
            [str(BIN / "rlhf"), "stack", "up", "--dir", str(stack_dir), "--no-deploy"], work, env
        )
        served = project(work / "served", overrides, args.default)
        result["pipeline_stack_s"] = timed(
            [str(BIN / "rlhf"), "run", "--prefect", "--stack-dir", str(stack_dir)], served, env
        )
        result["load_after"] = os.getloadavg()
    finally:
        result["stack_down_s"] = timed([str(BIN / "rlhf"), "stack", "down", "--dir", str(stack_dir)], work, env)
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / ("stack_results_default.json" if args.default else "stack_results.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

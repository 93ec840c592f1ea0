"""A night of scheduled runs on the stack: does anything grow run after run?

    .venv/bin/python benchmarks/night.py                  # 20 runs, one every 80 s (about 30 minutes)
    .venv/bin/python benchmarks/night.py --runs 5 --every 80

`rlhf stack up` from nothing in a fresh folder on free loopback ports; a project with the tests' tiny pipeline
(tests/stack_fixtures.py PASSING) deployed as prefect.yaml's rlhf-process deployment, its nightly cron replaced by an
interval schedule of --every seconds, so the stack's own worker runs it again and again. Before each run a labelling
team's delivery lands in data/incoming/ (`rlhf make-data --batch K`: new labelled pairs), so every run has new data
and every stage really runs; once, a run is left with nothing new, to show the one-line no-op. After each flow run ends
it records each service's resident memory (with its child processes), PostgreSQL's client connections, the worker's
state (memory, threads, open files, child processes, status on the server) and the run's outcome. Writes
benchmarks/night_results.json; `rlhf stack down` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from flows import stack as stack_mod  # noqa: E402
from stages.lib.environment import cpu_model  # noqa: E402
from tests.helpers import make_project  # noqa: E402
from tests.stack_fixtures import GIT, PASSING, free_ports  # noqa: E402

BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def api(config: stack_mod.StackConfig, path: str, body: Any = None, method: str | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{config.prefect_api_url}{path}",
        data=data,
        method=method or ("POST" if data else "GET"),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310 (loopback)
        raw = r.read()
    return json.loads(raw) if raw else None


MEMORY = ("rss", "pss", "uss", "private", "shared")  # what family_memory_mb measures, in MB


def family_memory_mb(pid: int) -> dict[str, float]:
    """Memory of a process and all its descendants, in MB: RSS (shared pages once per process: PostgreSQL's shared
    buffers once per backend), PSS (shared pages split among the processes sharing them, so it adds up), USS (pages
    only one process maps), and the split that tells a cache from a leak: `private`, the pages of private mappings
    (heap, stacks: what grows if a process leaks) and `shared`, the PSS of shared mappings (PostgreSQL's shared memory
    segment: buffer cache that fills up to shared_buffers; USS counts such a page as private when one process alone
    has touched it)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return dict.fromkeys(MEMORY, 0.0)
    total = dict.fromkeys(MEMORY, 0)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = p.memory_full_info()
            for kind in ("rss", "pss", "uss"):
                total[kind] += getattr(info, kind)
            for m in p.memory_maps(grouped=False):
                if "s" in m.perms:
                    total["shared"] += m.pss
                else:
                    total["private"] += m.private_clean + m.private_dirty
    return {k: round(v / 2**20, 1) for k, v in total.items()}


def pg_state(config: stack_mod.StackConfig) -> dict[str, Any]:
    """Over one connection: client connections per database (pg_stat_activity, client backends only), the size on
    disk of each of the stack's databases in MB, and how much of the shared buffer cache holds pages (pg_buffercache,
    PostgreSQL's contrib) against its size (shared_buffers): a cache that fills up to a fixed size, not a leak."""
    with stack_mod.pg_connect(config) as conn:
        rows = conn.execute(
            "select coalesce(datname, '-'), count(*) from pg_stat_activity where backend_type = 'client backend' "
            "and pid <> pg_backend_pid() group by 1"
        ).fetchall()
        sizes = {
            name: round(conn.execute("select pg_database_size(%s)", (name,)).fetchone()[0] / 2**20, 1)
            for name in stack_mod.DATABASES
        }
        conn.execute("create extension if not exists pg_buffercache")
        used = conn.execute("select count(*) from pg_buffercache where relfilenode is not null").fetchone()[0]
        block, buffers = conn.execute(
            "select current_setting('block_size')::int, setting::int from pg_settings where name = 'shared_buffers'"
        ).fetchone()
        conn.commit()
    return {
        "pg_connections": {name: n for name, n in rows},
        "pg_database_mb": sizes,
        "pg_shared_buffers_used_mb": round(used * block / 2**20, 1),
        "pg_shared_buffers_mb": round(buffers * block / 2**20, 1),
    }


def worker_state(config: stack_mod.StackConfig, pid: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    online = [w["status"] for w in api(config, f"/work_pools/{config.pool}/workers/filter", {"limit": 50})]
    return {
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "threads": proc.num_threads(),
        "open_files": proc.num_fds(),
        "children": len(proc.children(recursive=True)),
        "status": online,
    }


def snapshot(config: stack_mod.StackConfig) -> dict[str, Any]:
    procs = json.loads((config.home / stack_mod.STATE_FILE).read_text())["procs"]
    postmaster = stack_mod._postmaster(config)
    pids = {name: procs[name][0] for name in ("prefect", "mlflow", "worker")} | {"postgres": postmaster[0]}
    memory = {name: family_memory_mb(pid) for name, pid in pids.items()}
    return {
        **{f"{k}_mb": {name: m[k] for name, m in memory.items()} for k in MEMORY},
        **pg_state(config),
        "worker": worker_state(config, procs["worker"][0]),
    }


def interval_schedule(config: stack_mod.StackConfig, every: int) -> str:
    """Replace the deployment's schedules with one interval schedule; returns the deployment id."""
    deployment = api(config, "/deployments/name/rlhf-pipeline/rlhf-process")
    for schedule in deployment.get("schedules") or []:
        api(config, f"/deployments/{deployment['id']}/schedules/{schedule['id']}", method="DELETE")
    api(config, f"/deployments/{deployment['id']}/schedules", [{"schedule": {"interval": every}, "active": True}])
    return deployment["id"]


def flow_runs(config: stack_mod.StackConfig, deployment_id: str) -> list[dict[str, Any]]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    return api(config, "/flow_runs/filter", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--every", type=int, default=80, help="the schedule's interval in seconds")
    parser.add_argument("--idle-run", type=int, default=10, help="this run gets no new data (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "night_results.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-night-"))
    work.chmod(0o755)  # the stack's service user reaches its folders through this one
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PREFECT_HOME": str(work / "prefect-home")}
    stack_dir = work / "stack"
    pg, prefect, ml, ssh = free_ports(4)
    ports = ["--pg-port", str(pg), "--prefect-port", str(prefect), "--mlflow-port", str(ml), "--ssh-port", str(ssh)]
    result: dict[str, Any] = {
        "what": "a night of scheduled runs: the stack's worker runs the rlhf-process deployment on an interval "
        "schedule, each run with a new batch of labelled pairs in data/incoming/; after each run each service's "
        "memory with its children (RSS, PSS, USS), PostgreSQL's client connections, database sizes and shared buffers "
        "in use, and the worker's state",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "pipeline": "tiny (tests/stack_fixtures.py PASSING), 10 stages",
        "command": f".venv/bin/python benchmarks/night.py --runs {args.runs} --every {args.every}",
        "every_s": args.every,
        "runs": [],
    }
    t0 = time.monotonic()
    try:
        sh([str(BIN / "rlhf"), "stack", "up", "--dir", str(stack_dir), *ports, "--no-deploy"], work, env)
        config = stack_mod.config_from(work, {"dir": str(stack_dir)})
        project = make_project(work / "project", PASSING)
        shutil.copy(ROOT / "prefect.yaml", project)
        shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
        sh(["git", "add", "-A"], project, env)
        sh([*GIT, "commit", "-qm", "the project"], project, env)
        stack_mod.register_deployment(config, project, print)
        time.sleep(5)
        result["baseline"] = snapshot(config)  # idle: the stack up, the deployment registered, nothing run
        sh([str(BIN / "rlhf"), "make-data", "--batch", "1", "--pairs", "32"], project, env)
        deployment_id = interval_schedule(config, args.every)
        done: set[str] = set()
        for k in range(1, args.runs + 1):
            started = time.monotonic()
            while True:  # the next scheduled flow run of the deployment to end
                ended = [
                    r for r in flow_runs(config, deployment_id) if r["state_type"] in FINAL and r["id"] not in done
                ]
                if ended:
                    break
                if time.monotonic() - started > 20 * args.every:
                    raise SystemExit(f"run {k}: no flow run ended within {20 * args.every} s")
                time.sleep(2)
            run = ended[0]
            done.add(run["id"])
            if k < args.runs and k + 1 != args.idle_run:  # the next delivery, between two runs
                sh([str(BIN / "rlhf"), "make-data", "--batch", str(k + 1), "--pairs", "32"], project, env)
            time.sleep(3)  # the servers settle (connections back to their pools)
            logs = api(config, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
            said = [
                line["message"] for line in logs if line["message"].startswith(("nothing new", "new data", "ran: "))
            ]
            entry = {
                "run": k,
                "flow_run": run["name"],
                "state": run["state_type"],
                "seconds": round(run.get("total_run_time") or 0.0, 1),
                "said": said,
                **snapshot(config),
            }
            result["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # a night cut short keeps what it measured
        api(config, f"/deployments/{deployment_id}", {"paused": True}, method="PATCH")
    finally:
        result["wall_s"] = round(time.monotonic() - t0, 1)
        subprocess.run([str(BIN / "rlhf"), "stack", "down", "--dir", str(stack_dir)], cwd=work, env=env)
        shutil.rmtree(work, ignore_errors=True)
    result["summary"] = summarise(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Last run against run 3, per service; connections against the idle baseline; every flow run's state."""
    runs = result["runs"]
    if len(runs) < 3:
        return {}
    third, last = runs[2], runs[-1]
    total = lambda c: sum(c.values())  # noqa: E731
    memory = {}
    for kind in MEMORY:
        before, after = third[f"{kind}_mb"], last[f"{kind}_mb"]
        growth = {s: round(after[s] / before[s] - 1, 3) for s in before if before[s] > 0}
        memory |= {
            f"{kind}_mb_after_run_3": third[f"{kind}_mb"],
            f"{kind}_mb_after_run_{len(runs)}": last[f"{kind}_mb"],
            f"{kind}_growth_last_vs_run_3": growth,
            f"{kind}_within_20pct": all(abs(g) <= 0.2 for g in growth.values()),
        }
    return {
        "runs": len(runs),
        "completed": sum(r["state"] == "COMPLETED" for r in runs),
        **memory,
        "pg_shared_buffers_used_mb_after_each_run": [r["pg_shared_buffers_used_mb"] for r in runs],
        "pg_shared_buffers_mb": last["pg_shared_buffers_mb"],
        "pg_database_mb_after_each_run": [round(total(r["pg_database_mb"]), 1) for r in runs],
        "pg_connections_baseline": total(result["baseline"]["pg_connections"]),
        "pg_connections_after_each_run": [total(r["pg_connections"]) for r in runs],
        "worker_after_run_3": third["worker"],
        f"worker_after_run_{len(runs)}": last["worker"],
        "nothing_new_runs": [r["run"] for r in runs if any(s.startswith("nothing new") for s in r["said"])],
    }


if __name__ == "__main__":
    main()

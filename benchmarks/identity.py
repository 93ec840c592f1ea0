"""Byte identity of the default pipeline's outputs between two commits: a refactor must not change a single result.

    .venv/bin/python benchmarks/identity.py BEFORE AFTER [--out benchmarks/identity_results.json]
    .venv/bin/python benchmarks/identity.py BEFORE AFTER --reuse /tmp/id_before   # BEFORE already ran there
    .venv/bin/python benchmarks/identity.py BEFORE AFTER --reuse /tmp/b --reuse-after /tmp/a  # both did (make run)

Each commit is cloned into a temporary folder and runs `python -m flows.cli run` (every stage, this venv's
packages, the clone's own code: `python -m` puts the clone first on sys.path) with the same params.yaml it carries.
Then every file under the compared outputs is hashed on both sides. What may differ and is not compared: MLflow's
stores, run ids and durations (JSON keys and CSV columns named like run ids, `*_seconds`, `time/*`, `*per_second*`),
checkpoints (named by a fingerprint of the code). Records the CPU (`stages.lib.environment.cpu_model`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
COMPARED = (
    "artifacts/validate/data",
    "artifacts/sft",
    "artifacts/reward",
    "artifacts/judge",
    "artifacts/reward_gate",
    "artifacts/ppo",
    "artifacts/evaluate",
)
VOLATILE = ("mlflow_run_id", "run_id", "_seconds", "time/", "per_second")  # ids and times, not results


def _volatile(key: str) -> bool:
    return any(key == v or key.endswith(v) or key.startswith(v) or v in key for v in VOLATILE)


def _stable(obj: Any) -> Any:
    """A JSON value without the keys that differ on every run by design (run ids, durations, rates)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not _volatile(k)}
    return [_stable(v) for v in obj] if isinstance(obj, list) else obj


def _digest(path: Path) -> str:
    """md5 of a file; a JSON file without its run ids and times, a CSV without its time and rate columns."""
    data = path.read_bytes()
    if path.suffix == ".json":
        with contextlib.suppress(ValueError):  # not JSON after all: its bytes
            data = json.dumps(_stable(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(data.decode())))
        keep = [i for i, name in enumerate(rows[0] if rows else []) if not _volatile(name)]
        data = "\n".join(",".join(row[i] for i in keep) for row in rows).encode()
    return hashlib.md5(data).hexdigest()


def digests(project: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for folder in COMPARED:
        base = project / folder
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []
        out[folder] = {str(p.relative_to(base)): _digest(p) for p in files}
    return out


def run_commit(commit: str, where: Path) -> dict[str, float]:
    """Clone `commit` into `where` and run the whole pipeline there; its wall seconds and the CPU seconds (user +
    system) of the pipeline's processes, which a busy machine stretches far less than the wall time."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(where)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=where, check=True)
    env = dict(os.environ, PYTHONPATH=str(where))
    env.pop("MLFLOW_TRACKING_URI", None)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=where, env=env)
    if proc.returncode:
        raise SystemExit(f"the pipeline at {commit} exited {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--reuse", type=Path, help="a clone of BEFORE where the pipeline already ran")
    parser.add_argument("--reuse-after", type=Path, help="a clone of AFTER where the pipeline already ran (make run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/identity_results.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="identity-") as tmp:
        before_dir = args.reuse or Path(tmp) / "before"
        walls = {"before": None if args.reuse else run_commit(args.before, before_dir)}
        after_dir = args.reuse_after or Path(tmp) / "after"
        walls["after"] = None if args.reuse_after else run_commit(args.after, after_dir)
        before, after = digests(before_dir), digests(after_dir)
    differ = {
        folder: sorted(
            f for f in set(before[folder]) | set(after[folder]) if before[folder].get(f) != after[folder].get(f)
        )
        for folder in COMPARED
    }
    differ = {k: v for k, v in differ.items() if v}
    result = {
        "what": "the default pipeline (`python -m flows.cli run`, params.yaml as committed) at two commits, each in a "
        "fresh clone; md5 of every output file (JSON files without run ids and times)",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "before": args.before,
        "after": args.after,
        "identical": not differ,
        "differ": differ,
        "pipeline_seconds": walls,
        "files": after,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"identical: {not differ}" + (f"; differ: {differ}" if differ else ""))
    return 0 if not differ else 1


if __name__ == "__main__":
    raise SystemExit(main())

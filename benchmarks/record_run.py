"""Record a finished `make run` as a results file: the numbers docs/results.md and README.md show come from here.

    git clone . /tmp/run && cd /tmp/run && /usr/bin/time -f %e -o wall.txt make run
    .venv/bin/python benchmarks/record_run.py --project /tmp/run --wall "$(cat /tmp/run/wall.txt)" --setup 150

The real profile (`make run-real`, docs/real-model.md) the same way, with its peak memory and disk:

    git clone . /tmp/real && cd /tmp/real && make setup && /usr/bin/time -v -o time.txt make run-real
    .venv/bin/python benchmarks/record_run.py --project /tmp/real --profile real --time-log /tmp/real/time.txt

Reads the project's artifacts (every stage's metrics.json), the stage runs' durations from its MLflow store, and
writes benchmarks/make_run_results.json with the CPU (stages.lib.environment.cpu_model), the date and the commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import yaml

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def stage_seconds(project: Path) -> dict[str, float]:
    """Each stage's last MLflow run: end - start, seconds (the stage's own work, in the flow's process)."""
    db = sqlite3.connect(project / "mlflow.db")
    rows = db.execute("select name, start_time, end_time from runs where end_time is not null order by start_time")
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])  # not the flow's parent run
    return {name: round((end - start) / 1000, 1) for name, start, end in rows if name in stages}


def time_log(path: Path) -> dict[str, float]:
    """Wall seconds and peak resident memory (the largest process: the flow runs every stage in it) from GNU time -v."""
    text = path.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    h, m, s = (float(x or 0) for x in wall.groups()) if wall else (0, 0, 0)
    return {"peak_rss_mb": int(rss.group(1)) / 1024 if rss else None, "wall_s": round(h * 3600 + m * 60 + s, 1)}


def disk(project: Path) -> dict[str, float]:
    """MB on disk after the run, by where: the stages' outputs, PPO's checkpoints, the MLflow store (registry model
    copies included), DVC's cache, and the converted base model (shared by every run on the machine)."""
    from stages.lib.pretrained import cache_root

    def du(path: Path) -> float:
        files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] if path.exists() else []
        return round(sum(p.stat().st_size for p in files) / 2**20, 1)

    where = {
        "artifacts": project / "artifacts",
        "checkpoints": project / "checkpoints",
        "mlflow": project / "mlartifacts",
        "mlruns": project / "mlruns",
        "dvc_cache": project / ".dvc" / "cache",
        "model_cache": cache_root(),
    }
    sizes = {k: du(v) for k, v in where.items()}
    return sizes | {"project_total": round(sum(v for k, v in sizes.items() if k != "model_cache"), 1)}


def samples(evaluate: Path, n: int = 6) -> list[dict]:
    """The evaluation's side-by-side samples (prompt, SFT's reply, PPO's reply, their scores): the first reply to each
    of the first `n` distinct prompts, in the file's order (no choosing)."""
    path = evaluate / "samples.jsonl"
    first: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        first.setdefault(row["prompt"], row)
    return list(first.values())[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--wall", type=float, help="make run's wall seconds (or --time-log's)")
    parser.add_argument("--setup", type=float, default=0.0, help="of which the venv's set-up (seconds)")
    parser.add_argument("--profile", help="the profile the run used (`make run-real`: real)")
    parser.add_argument("--time-log", type=Path, help="`/usr/bin/time -v -o FILE` of the run: wall and peak memory")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    timed = time_log(args.time_log) if args.time_log else {}
    args.wall = args.wall if args.wall is not None else timed["wall_s"]
    args.out = args.out or ROOT / "benchmarks" / (
        f"{args.profile}_profile_results.json" if args.profile else "make_run_results.json"
    )
    art = args.project / "artifacts"

    def metrics(stage: str) -> dict:
        path = art / stage / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    ev, ppo = metrics("evaluate"), metrics("ppo")
    result = {
        "what": "`make run` from a fresh clone on the embedded default task (seeded, fp32)",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=args.project, capture_output=True, text=True
        ).stdout.strip(),
        "command": "git clone . /tmp/run && cd /tmp/run && make run",
        "make_run_s": args.wall,
        "setup_s": args.setup,
        "after_setup_s": round(args.wall - args.setup, 1),
        "stage_s": stage_seconds(args.project),
        "labeler": json.loads(labeler.read_text())
        if (labeler := args.project / "data/labeler.json").exists()
        else None,
        "comparisons": metrics("comparisons"),
        "reward": {k: v for k, v in metrics("reward").items() if not k.startswith(("train_trunc", "test_trunc"))},
        "reward_gate": metrics("reward_gate"),
        "ppo": {k: ppo.get(k) for k in ("outcome", "steps_done", "kept_step", "kept_because", "estimator")}
        | {"kl": (ppo.get("final") or {}).get("objective/kl")},
        "evaluate": {k: v for k, v in ev.items() if "/" not in k or k.startswith(("bon/", "sft/", "ppo/"))},
        "promote": metrics("promote"),
    }
    if args.profile:
        result |= {
            "what": f"`make run-real` (profiles/{args.profile}.yaml) from a fresh clone, after `make setup` (fp32)",
            "command": f"git clone . /tmp/real && cd /tmp/real && make setup && make run-{args.profile}",
            "profile": yaml.safe_load((args.project / "profiles" / f"{args.profile}.yaml").read_text()),
            "labeler": None,
            "sft": metrics("sft"),
            "judge": {k: v for k, v in metrics("judge").items() if not k.startswith(("train_trunc", "test_trunc"))},
            "peak_rss_mb": timed.get("peak_rss_mb"),
            "disk_mb": disk(args.project),
            "samples": samples(art / "evaluate"),
        }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}: make run {args.wall:.0f} s ({result['after_setup_s']:.0f} s after set-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

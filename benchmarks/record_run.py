"""Record a finished `make run` as a results file: the numbers docs/results.md and README.md show come from here.

    git clone . /tmp/run && cd /tmp/run && /usr/bin/time -f %e -o wall.txt make run
    .venv/bin/python benchmarks/record_run.py --project /tmp/run --wall "$(cat /tmp/run/wall.txt)" --setup 150

Reads the project's artifacts (every stage's metrics.json), the stage runs' durations from its MLflow store, and
writes benchmarks/make_run_results.json with the CPU (stages.lib.environment.cpu_model), the date and the commit.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def stage_seconds(project: Path) -> dict[str, float]:
    """Each stage's last MLflow run: end - start, seconds (the stage's own work, in the flow's process)."""
    db = sqlite3.connect(project / "mlflow.db")
    rows = db.execute("select name, start_time, end_time from runs where end_time is not null order by start_time")
    return {name: round((end - start) / 1000, 1) for name, start, end in rows if name != "rlhf-pipeline"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--wall", type=float, required=True, help="make run's wall seconds")
    parser.add_argument("--setup", type=float, default=0.0, help="of which the venv's set-up (seconds)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/make_run_results.json")
    args = parser.parse_args()
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
        "labeler": json.loads((args.project / "data/labeler.json").read_text()),
        "comparisons": metrics("comparisons"),
        "reward": {k: v for k, v in metrics("reward").items() if not k.startswith(("train_trunc", "test_trunc"))},
        "reward_gate": metrics("reward_gate"),
        "ppo": {k: ppo.get(k) for k in ("outcome", "steps_done", "kept_step", "kept_because", "estimator")}
        | {"kl": (ppo.get("final") or {}).get("objective/kl")},
        "evaluate": {k: v for k, v in ev.items() if "/" not in k or k.startswith(("bon/", "sft/", "ppo/"))},
        "promote": metrics("promote"),
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}: make run {args.wall:.0f} s ({result['after_setup_s']:.0f} s after set-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

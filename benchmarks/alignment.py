"""The alignment comparison of issue 18: PPO (GAE) and the critic-free estimators (RLOO, GRPO, REINFORCE++) over
several seeds, beside best-of-n and DPO, on the default task, graded by the gold judge.

    .venv/bin/python benchmarks/alignment.py --project .            # after `make run` (it reuses SFT, RM, judge, DPO)
    .venv/bin/python benchmarks/alignment.py --project . --seeds 0 1 2 --estimators gae rloo grpo reinforce_pp

Each (estimator, seed) runs the PPO stage and then the evaluation stage as processes of their own, with the project's
params.yaml but `ppo.estimator` and `ppo.seed` (and `evaluate.seed`) set, writing under benchmarks/alignment_runs/
(git-ignored). Per run it records the judge's win-rate over SFT and its 95% CI, the mean judge's score, the KL to SFT,
the kept step, the PPO stage's wall time and its peak RSS (the child process's ru_maxrss). The summary gives each
estimator's mean and spread over seeds, and best-of-n and DPO from the evaluations. Writes
benchmarks/alignment_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd`; (wall seconds, the child's own peak RSS in MB, from wait4). Fails loudly with its output."""
    start = time.monotonic()
    with open(cwd / ".alignment-run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(cwd / '.alignment-run.log').read_text()[-4000:]}")
    return seconds, usage.ru_maxrss / 1024


def one(project: Path, out: Path, estimator: str, seed: int, overrides: dict | None = None) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in (overrides or {}).items():
        params[section] = {**params.get(section, {}), **values}
    params["ppo"] |= {"estimator": estimator, "seed": seed, "checkpoint_dir": str(out / "checkpoints")}
    params["evaluate"]["seed"] = seed + 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    py = [sys.executable, "-m"]
    data, reward = "artifacts/validate/data", "artifacts/reward"
    seconds, rss = timed(
        [
            *py,
            "stages.ppo",
            "--params",
            str(out / "params.yaml"),
            "--data",
            data,
            "--sft",
            "artifacts/sft/model",
            "--rm",
            f"{reward}/model",
            "--norm",
            f"{reward}/norm.json",
            "--judge",
            "artifacts/judge/model",
            "--gate",
            "",
            "--out",
            str(out / "ppo"),
            "--no-tracking",
        ],
        project,
    )
    timed(
        [
            *py,
            "stages.evaluate",
            "--params",
            str(out / "params.yaml"),
            "--data",
            data,
            "--sft",
            "artifacts/sft/model",
            "--policy",
            str(out / "ppo/model"),
            "--rm",
            f"{reward}/model",
            "--norm",
            f"{reward}/norm.json",
            "--judge",
            "artifacts/judge/model",
            "--dpo",
            "artifacts/dpo",
            "--kl",
            str(out / "ppo/kl.csv"),
            "--monitor",
            str(out / "ppo/monitor.csv"),
            "--out",
            str(out / "evaluate"),
        ],
        project,
    )
    ev = json.loads((out / "evaluate/metrics.json").read_text())
    ppo = json.loads((out / "ppo/metrics.json").read_text())
    return {
        "estimator": estimator,
        "seed": seed,
        "win_rate_vs_sft": ev["win_rate_vs_sft"],
        "win_rate_ci95": ev["win_rate_vs_sft_ci95"],
        "judge": ev["ppo/judge"],
        "sft_judge": ev["sft/judge"],
        "kl": ev["ppo/kl_k1_seq"],
        "kept_step": ppo["kept_step"],
        "overoptimisation": ev["overoptimisation"],
        "ppo_seconds": round(seconds, 1),
        "ppo_peak_rss_mb": round(rss),
        "evaluation": ev,
    }


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for est in dict.fromkeys(r["estimator"] for r in runs):
        mine = [r for r in runs if r["estimator"] == est]
        stats = {}
        for key in ("win_rate_vs_sft", "judge", "kl", "ppo_seconds", "ppo_peak_rss_mb"):
            values = [r[key] for r in mine]
            stats[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
        out[est] = stats
    evaluations = [r["evaluation"] for r in runs]
    ladder = sorted({int(k.split("/")[1]) for e in evaluations for k in e if k.startswith("bon/")})
    for n in ladder:
        values = [e[f"bon/{n}/win_rate_vs_sft"] for e in evaluations]
        out[f"best-of-{n}"] = {
            "win_rate_vs_sft": {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            },
            "kl": {"mean": evaluations[0][f"bon/{n}/kl"], "sd": 0.0},
        }
    if all("dpo_win_rate_vs_sft" in e for e in evaluations):
        values = [e["dpo_win_rate_vs_sft"] for e in evaluations]
        out["dpo"] = {
            "win_rate_vs_sft": {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            },
            "kl": {"mean": statistics.mean(e["dpo/kl_k1_seq"] for e in evaluations), "sd": 0.0},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(ROOT), help="a project after `make run` (SFT, RM, judge, DPO ready)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=["gae", "rloo", "grpo", "reinforce_pp"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/alignment_runs"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks/alignment_results.json"))
    args = parser.parse_args()
    project = Path(args.project).resolve()
    runs = []
    for estimator in args.estimators:
        for seed in args.seeds:
            runs.append(one(project, Path(args.out) / f"{estimator}-{seed}", estimator, seed))
            r = runs[-1]
            print(
                f"{estimator} seed {seed}: win-rate {r['win_rate_vs_sft']:.3f} ±{r['win_rate_ci95']:.3f}, judge "
                f"{r['judge']:.3f} (SFT {r['sft_judge']:.3f}), KL {r['kl']:.2f}, kept step {r['kept_step']}, "
                f"{r['ppo_seconds']:.0f} s, {r['ppo_peak_rss_mb']} MB",
                flush=True,
            )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "seeds": args.seeds,
        "summary": summarise(runs),
        "runs": [{k: v for k, v in r.items() if k != "evaluation"} for r in runs],
    }
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()

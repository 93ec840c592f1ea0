"""Is the reward model what limits PPO on the default task? PPO on the gold judge itself beside PPO on the reward model.

    .venv/bin/python benchmarks/onpolicy.py --project . --gold-reward --rm-from benchmarks/onpolicy_runs \\
        --runs benchmarks/onpolicy_runs/gold                                          # the gold judge as reward
    .venv/bin/python benchmarks/onpolicy.py --project . --gold-reward --rm-from benchmarks/onpolicy_runs \\
        --runs benchmarks/onpolicy_runs/gold80 --set ppo.num_steps=80                 # ... for 80 steps
    .venv/bin/python benchmarks/onpolicy.py --project . --rm-from benchmarks/onpolicy_runs \\
        --runs benchmarks/onpolicy_runs/rm80 --set ppo.num_steps=80                   # the reward model, 80 steps
    .venv/bin/python benchmarks/gold_reward.py rm_25=benchmarks/onpolicy_runs gold_25=benchmarks/onpolicy_runs/gold \\
        gold_80=benchmarks/onpolicy_runs/gold80 rm_80=benchmarks/onpolicy_runs/rm80

Per variant and seed: what PPO climbed (a folder whose ppo/ holds gold_norm.json climbed the gold judge,
benchmarks/gold_reward_ppo.py), the evaluation on the test prompts (gold win-rate over SFT with its prompt-clustered
95% CI, paired gold difference, KL, the over-optimisation flag) and the monitor's curve over PPO's checkpoints on the
dev prompts (the reward model's normalised score and the gold judge's score, step 0 = SFT). Writes
benchmarks/gold_reward_results.json and docs/img/ppo-gold-reward.png (the judge's and the reward model's score over
PPO's steps, a line per variant and seed), with the CPU (stages.lib.environment.cpu_model).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import frontier  # this folder is sys.path[0] when a script here runs
import yaml

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def seed_result(folder: Path) -> dict | None:
    """One seed's evaluation point (frontier.py's: win-rate, CI, gold difference, KL, the ladder), what PPO climbed,
    the over-optimisation flag, the kept step, PPO's time and the monitor's curve (None if the evaluation did not
    finish)."""
    point = frontier.seed_result(folder)
    if point is None:
        return None
    ev = json.loads((folder / "evaluate" / "metrics.json").read_text())
    ppo = json.loads((folder / "ppo" / "metrics.json").read_text())
    with open(folder / "ppo" / "monitor.csv") as f:
        monitor = [
            {k: round(float(v), 4) for k, v in row.items() if k in ("step", "rm_score", "judge")}
            for row in csv.DictReader(f)
        ]
    with open(folder / "ppo" / "kl.csv") as f:
        train_s = sum(float(row["time/step"]) for row in csv.DictReader(f))
    return {
        "reward": "gold judge" if (folder / "ppo" / "gold_norm.json").exists() else "reward model",
        "num_steps": yaml.safe_load((folder / "params.yaml").read_text())["ppo"]["num_steps"],
        **point,
        "overoptimisation": bool(ev["overoptimisation"]),
        "kept_step": ppo["kept_step"],
        "train_s": round(train_s, 1),  # PPO's steps (rollout, score, update), without the monitor's checkpoints
        "monitor": monitor,
    }


def plot(variants: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, v in zip(colours, variants.values(), strict=False):
        for i, run in enumerate(v["seeds"].values()):
            steps = [m["step"] for m in run["monitor"]]
            what = f"{run['reward']}, {run['num_steps']} steps"
            label = f"{what}: test win-rate {v['win_rate_mean']:.3f}" if i == 0 else None
            for ax, key in zip(axes, ("judge", "rm_score"), strict=True):
                ax.plot(steps, [m[key] for m in run["monitor"]], color=colour, alpha=0.8, label=label, marker=".")
    axes[0].set(title="gold judge on the dev prompts", xlabel="PPO step", ylabel="mean gold score")
    axes[1].set(title="reward model on the dev prompts", xlabel="PPO step", ylabel="normalised RM score")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("PPO climbing the gold judge itself vs the reward model (one line per seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/gold_reward_results.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/ppo-gold-reward.png")
    args = parser.parse_args()
    variants = {}
    for item in args.variants:
        name, folder = item.split("=", 1)
        runs = {str(s): r for s in args.seeds if (r := seed_result(Path(folder) / f"seed_{s}"))}
        rates = [r["win_rate"] for r in runs.values()]
        kinds = {r["reward"] for r in runs.values()}
        if len(kinds) > 1:
            raise SystemExit(f"{folder}: its seeds climbed different rewards ({sorted(kinds)})")
        variants[name] = {
            "folder": folder,
            "seeds_evaluated": len(runs),
            "seeds": runs,
            "win_rate_mean": round(statistics.mean(rates), 4),
            "kl_mean": round(statistics.mean(r["kl"] for r in runs.values()), 3),
            "every_seed_ci_above_half": all(r["win_rate_ci"][0] > 0.5 for r in runs.values()),
            "overoptimisation_flags": sum(r["overoptimisation"] for r in runs.values()),
            "train_s_median": statistics.median(r["train_s"] for r in runs.values()),
        }
    result = {
        "what": "PPO climbing the gold judge itself (benchmarks/gold_reward_ppo.py) beside PPO climbing the seed's "
        "reward model, same SFT start, reference, KL coefficient, monitor and keep-best; gold win-rate over SFT on the "
        "test prompts, monitor curves on the dev prompts",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "command": "benchmarks/gold_reward.py " + " ".join(f'"{v}"' for v in args.variants),
        "variants": variants,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(variants, args.plot)
    for name, v in variants.items():
        print(f"{name}: win-rate {v['win_rate_mean']:.3f}, KL {v['kl_mean']:.2f}, flags {v['overoptimisation_flags']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

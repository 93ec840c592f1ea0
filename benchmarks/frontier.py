"""PPO's (KL, gold win-rate) points beside the best-of-n ladder, per seed: does any PPO setting beat RM-picked
best-of-n at matched KL? Reads benchmarks/onpolicy.py's run folders (a base run and `--rm-from` sweeps of PPO on
the same reward models), writes one results file and one plot.

    .venv/bin/python benchmarks/onpolicy.py --project . --seeds 0 1 2                # the base: reward models + PPO
    .venv/bin/python benchmarks/onpolicy.py --project . --rm-from benchmarks/onpolicy_runs \\
        --runs benchmarks/onpolicy_runs/A --set ppo.kl_coef=0.2 ppo.num_steps=40       # a PPO variant, same RMs
    .venv/bin/python benchmarks/frontier.py base=benchmarks/onpolicy_runs A=benchmarks/onpolicy_runs/A ...
    .venv/bin/python benchmarks/frontier.py --add B=benchmarks/onpolicy_runs/B   # more variants, the rest kept

Each variant's seeds are compared with the best-of-n ladder of the same seed's reward model (every evaluation of a
seed draws the same SFT replies: evaluate.seed is the seed's). Matched best-of-n is the evaluation's own rule: the
smallest n whose KL bound (log n - (n-1)/n) is at least PPO's KL; past the ladder's end there is no baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import UTC, datetime
from pathlib import Path

import yaml

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MAX_TAX = yaml.safe_load((ROOT / "params.yaml").read_text())["promote"]["max_alignment_tax"]
PPO_KEYS = (
    "num_steps",
    "batch_size",
    "kl_coef",
    "learning_rate",
    "estimator",
    "group_size",
    "adaptive_kl",
    "kl_target",
    "kl_horizon",
    "ensemble_penalty",
)


def seed_result(folder: Path) -> dict | None:
    """One seed's PPO point and best-of-n ladder, from its evaluation's metrics.json (None if it did not finish)."""
    metrics = folder / "evaluate" / "metrics.json"
    if not metrics.exists():
        return None
    ev = json.loads(metrics.read_text())
    ladder = sorted({int(k.split("/")[1]) for k in ev if k.startswith("bon/") and k.endswith("/kl")})
    n = ev["bon_matched_n"]
    return {
        "prompts": ev.get("prompts", 41),  # distinct evaluation prompts (41 before the dev/test split of d4c56dc)
        "win_rate": round(ev["win_rate_vs_sft"], 4),
        "win_rate_ci": [round(x, 4) for x in ev["win_rate_vs_sft_ci"]],
        "judge_diff": round(ev["judge_diff_vs_sft"], 4),
        "kl": round(ev["ppo/kl_k1_seq"], 3),
        # the perplexity rise on every held-out demonstration: the promotion's tax before evaluate.tax_share (the
        # evaluations of the first variants predate it), so the column means one thing for every run
        "alignment_tax": round(ev.get("alignment_tax_all", ev["alignment_tax"]), 3),
        "matched_n": n,
        "matched_bon_win_rate": round(ev[f"bon/{n}/win_rate_vs_sft"], 4) if n else None,
        "beats_matched_bon": ev["ppo_beats_matched_bon"],
        "ladder": {str(m): [round(ev[f"bon/{m}/kl"], 3), round(ev[f"bon/{m}/win_rate_vs_sft"], 4)] for m in ladder},
    }


def variant(folder: Path, seeds: list[int]) -> dict:
    runs = {s: seed_result(folder / f"seed_{s}") for s in seeds}
    done = {s: r for s, r in runs.items() if r}
    params = folder / f"seed_{next(iter(done))}" / "params.yaml" if done else None
    used = yaml.safe_load(params.read_text()) if params and params.exists() else {}
    ppo = used.get("ppo", {})
    compared = [r for r in done.values() if r["beats_matched_bon"] is not None]
    return {
        "folder": str(folder),  # benchmarks/onpolicy.py --runs FOLDER (--rm-from the base's folder, --set ...)
        "ppo": {k: ppo.get(k) for k in PPO_KEYS},
        "reward_ensemble": used.get("reward", {}).get("ensemble", 1),  # reward models PPO scored with
        "seeds": {str(s): r for s, r in done.items()},
        "win_rate_mean": round(statistics.mean(r["win_rate"] for r in done.values()), 4) if done else None,
        "kl_mean": round(statistics.mean(r["kl"] for r in done.values()), 3) if done else None,
        "beats_matched_bon": f"{sum(r['beats_matched_bon'] for r in compared)} of {len(compared)}",
        "past_the_ladder": sum(r["beats_matched_bon"] is None for r in done.values()),
        "over_alignment_tax": sum(r["alignment_tax"] > MAX_TAX for r in done.values()),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({s for v in result["variants"].values() for s in v["seeds"]})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds) + 2.4, 3.6), sharey=True, squeeze=False)
    markers, colours = "osD^vP*X", plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, seed in zip(axes[0], seeds, strict=True):
        ladder = next(v["seeds"][seed]["ladder"] for v in result["variants"].values() if seed in v["seeds"])
        xs, ys = zip(*ladder.values(), strict=True)
        ax.plot(xs, ys, "-", color="0.5", label="best-of-n (RM picks)")
        for n, (x, y) in ladder.items():
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(0, 4), fontsize=7, color="0.4")
        for i, (name, v) in enumerate(result["variants"].items()):  # every variant: markers and colours cycle apart
            if seed in v["seeds"]:
                r = v["seeds"][seed]
                ax.errorbar(r["kl"], r["win_rate"], yerr=[[r["win_rate"] - r["win_rate_ci"][0]],
                            [r["win_rate_ci"][1] - r["win_rate"]]], fmt=markers[i % len(markers)],
                            color=colours[i % len(colours)], capsize=2, label=name)  # fmt: skip
        ax.axhline(0.5, color="0.8", lw=0.8)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("KL to SFT (nats per reply)")
    axes[0][0].set_ylabel("gold win-rate over SFT")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center right")  # beside, not over, a point
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/frontier_results.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/ppo-frontier.png")
    parser.add_argument(
        "--add", action="store_true", help="keep --out's variants (their folders may be gone) and add these"
    )
    args = parser.parse_args()
    earlier = json.loads(args.out.read_text()) if args.add else {"command": "", "variants": {}}
    result = {
        "what": "PPO variants on the same per-seed reward models, each seed's gold win-rate over SFT (every "
        "evaluation prompt x 8 replies, `prompts` of them, 95% CI clustered by prompt) at its KL, beside that "
        "seed's RM-picked best-of-n ladder; over_alignment_tax counts the seeds whose alignment tax is above "
        "promote.max_alignment_tax",
        "max_alignment_tax": MAX_TAX,
        "cpu": cpu_model(),
        "date": " and ".join(
            dict.fromkeys([*filter(None, earlier.get("date", "").split(" and ")), datetime.now(UTC).date().isoformat()])
        ),
        "command": "; ".join(c for c in (earlier["command"], "benchmarks/frontier.py " + " ".join(args.variants)) if c),
        "variants": earlier["variants"]
        | {name: variant(Path(folder), args.seeds) for name, folder in (v.split("=", 1) for v in args.variants)},
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    for name, v in result["variants"].items():
        print(
            f"{name:>6} {v['ppo']}: win-rate mean {v['win_rate_mean']}, KL mean {v['kl_mean']}, beats matched "
            f"best-of-n {v['beats_matched_bon']} (past the ladder: {v['past_the_ladder']})"
        )
        for s, r in v["seeds"].items():
            print(f"       seed {s}: {r['win_rate']:.3f} {r['win_rate_ci']} KL {r['kl']:.2f} vs best-of-"
                  f"{r['matched_n']} {r['matched_bon_win_rate']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

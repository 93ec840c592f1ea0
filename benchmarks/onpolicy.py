"""Does RLHF make the model better? The default pipeline's RLHF half over several seeds, graded by the gold judge.

    .venv/bin/python benchmarks/onpolicy.py --project .                 # after `make run` (reuses validate, SFT, judge)
    .venv/bin/python benchmarks/onpolicy.py --project . --seeds 0 1 2 --dpo
    # a PPO sweep on those seeds' reward models: only PPO and the evaluation run again
    .venv/bin/python benchmarks/onpolicy.py --project . --rm-from benchmarks/onpolicy_runs \
        --runs benchmarks/onpolicy_runs/kl02 --set ppo.kl_coef=0.2 ppo.num_steps=40 --out /tmp/kl02.json

For each seed, the stages after SFT run as processes of their own, exactly as dvc.yaml runs them but with the
project's params.yaml plus `seed` set in comparisons, reward, ppo, dpo (and evaluate.seed = seed + 1), writing under
benchmarks/onpolicy_runs/seed_<k>/ (git-ignored): comparisons -> reward -> reward_gate -> ppo (-> dpo) -> evaluate.
The SFT baseline, the data and the labeler's noise are the project's. Per seed it records the evaluation (the judge's
win-rate over SFT with its prompt-clustered 95% interval, the paired judge difference, ties, KL, the best-of-n ladder,
the matched best-of-n and whether PPO beat it, DPO), the reward model on the policy's own replies beside the labels'
ceiling there, the gate's verdict, PPO's kept step, and every stage's wall time; the summary gives the means over
seeds. Writes benchmarks/onpolicy_results.json, with the CPU (stages.lib.environment.cpu_model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DATA, SFT, JUDGE = "artifacts/validate/data", "artifacts/sft/model", "artifacts/judge/model"
REUSE = False  # --reuse: keep what an earlier run trained, evaluate again (e.g. with a longer best-of-n ladder)
OVERRIDES: dict = {}  # --set ppo.kl_coef=0.2 ...: params changed in every seed's params.yaml
SHARED = ("comparisons", "reward", "reward_gate")  # --rm-from DIR: these stages are DIR's, PPO and evaluation run anew
RM_FROM: Path | None = None
MODULES = {"ppo": "stages.ppo"}  # --gold-reward: PPO runs as benchmarks.gold_reward_ppo (the gold judge as reward)


def stage(project: Path, out: Path, name: str, *args: str) -> float | None:
    """`python -m stages.<name> --params <seed's params> ARGS` in `project`; its wall seconds. Fails loudly. With
    REUSE, a stage whose metrics.json exists (from an earlier run of this benchmark) is not run again (None)."""
    if (REUSE or (RM_FROM and name in SHARED)) and name != "evaluate" and (out / name / "metrics.json").exists():
        return None
    start = time.monotonic()
    cmd = [sys.executable, "-m", MODULES.get(name, f"stages.{name}"), "--params", str(out / "params.yaml"), *args]
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, cwd=project, stdout=log, stderr=subprocess.STDOUT).returncode
    if code == 3 and name == "reward_gate":  # the gate stopped this seed: recorded, not a crash
        return None
    if code:
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{(out / f'{name}.log').read_text()[-3000:]}")
    return round(time.monotonic() - start, 1)


def overridden(params: dict) -> dict:
    """`params` with --set's values in place (section.key=value, as `dvc exp run -S` sets them)."""
    for key, value in OVERRIDES.items():
        *path, last = key.split(".")
        section = params
        for part in path:
            section = section[part]
        section[last] = value
    return params


def one(project: Path, out: Path, seed: int, dpo: bool) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    if REUSE and (out / "params.yaml").exists():  # the trained stages' params, the evaluation's from the project
        params = yaml.safe_load((out / "params.yaml").read_text()) | {"evaluate": params["evaluate"]}
    for section in ("comparisons", "reward", "ppo", "dpo"):
        params[section]["seed"] = seed
    params["evaluate"]["seed"] = seed + 1
    params["ppo"]["checkpoint_dir"] = str(out / "checkpoints")
    params["dpo"]["enabled"] = dpo
    overridden(params)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    c, r, g, p, d = (str(out / x) for x in ("comparisons", "reward", "reward_gate", "ppo", "dpo"))
    seconds = {
        "comparisons": stage(
            project, out, "comparisons", "--data", DATA, "--policy", SFT, "--out", c, "--reports", str(out / "reports")
        ),
        "reward": stage(project, out, "reward", "--data", DATA, "--sft", SFT, "--comparisons", c, "--out", r),
        "reward_gate": stage(
            project,
            out,
            "reward_gate",
            "--reward",
            f"{r}/metrics.json",
            "--labeler",
            "data/labeler.json",
            "--heldout",
            f"{DATA}/preferences_test.jsonl",
            "--judge-metrics",
            "artifacts/judge/metrics.json",
            "--comparisons-metrics",
            f"{c}/metrics.json",
            "--out",
            g,
        ),
    }
    gate = json.loads((Path(g) / "metrics.json").read_text())
    if not gate["passed"]:  # the gate stopped this seed before PPO: that is the result
        return {"seed": seed, "gate": gate["reason"], "gate_passed": False, "seconds": seconds}
    seconds |= {
        "ppo": stage(
            project,
            out,
            "ppo",
            "--data",
            DATA,
            "--sft",
            SFT,
            "--rm",
            f"{r}/model",
            "--norm",
            f"{r}/norm.json",
            "--judge",
            JUDGE,
            "--gate",
            f"{g}/passed.json",
            "--out",
            p,
        ),
        "dpo": stage(project, out, "dpo", "--data", DATA, "--sft", SFT, "--comparisons", c, "--out", d),
    }
    seconds["evaluate"] = stage(
        project,
        out,
        "evaluate",
        "--data",
        DATA,
        "--sft",
        SFT,
        "--policy",
        f"{p}/model",
        "--rm",
        f"{r}/model",
        "--norm",
        f"{r}/norm.json",
        "--judge",
        JUDGE,
        "--dpo",
        d,
        "--kl",
        f"{p}/kl.csv",
        "--monitor",
        f"{p}/monitor.csv",
        "--out",
        str(out / "evaluate"),
    )
    ev = json.loads((out / "evaluate/metrics.json").read_text())
    rm = json.loads((Path(r) / "metrics.json").read_text())
    compared = json.loads((Path(c) / "metrics.json").read_text())
    ppo = json.loads((Path(p) / "metrics.json").read_text())
    keys = (
        "win_rate_vs_sft",
        "win_rate_vs_sft_ci",
        "judge_diff_vs_sft",
        "judge_diff_vs_sft_ci",
        "ties_vs_sft",
        "ppo/kl_k1_seq",
        "sft/judge",
        "ppo/judge",
        "bon_matched_n",
        "ppo_beats_matched_bon",
        "overoptimisation",
        "dpo_win_rate_vs_sft",
        "dpo_win_rate_vs_sft_ci",
        "dpo/kl_k1_seq",
        "prompts",
        "samples_per_prompt",
    )
    return {
        "seed": seed,
        "evaluation": {k: ev.get(k) for k in keys}
        | {k: v for k, v in ev.items() if k.startswith("bon/") and not k.endswith("_ci95")},
        "reward": {
            k: rm.get(k)
            for k in (
                "accuracy",
                "on_policy_accuracy",
                "on_policy_gold_pair_accuracy",
                "bon_n",
                "bon_gold_gain",
                "bon_gold_headroom",
                "n_train",
            )
        },
        "labels_gold_agreement_test": compared["labeler_gold_agreement_test"],
        "gate": gate["reason"],
        "gate_passed": True,
        "ppo": {"kept_step": ppo["kept_step"], "kept_because": ppo["kept_because"], "steps": ppo["steps_done"]},
        "seconds": seconds,
    }


def beats_best_of_n(e: dict) -> bool:
    """PPO above RM-picked best-of-n at the smallest n whose KL is at least PPO's; past the ladder's last rung (no
    matched n), above every rung of it."""
    if e["bon_matched_n"] is not None:
        return bool(e["ppo_beats_matched_bon"])
    rungs = [v for k, v in e.items() if k.startswith("bon/") and k.endswith("/win_rate_vs_sft")]
    return bool(rungs) and e["win_rate_vs_sft"] > max(rungs)


def summarise(every: list[dict]) -> dict:
    runs = [r for r in every if r["gate_passed"]]

    def mean(get) -> float:  # noqa: ANN001
        values = [get(r) for r in runs if get(r) is not None]
        return round(statistics.mean(values), 4) if values else None

    return {
        "seeds": len(every),
        "gate_stops": len(every) - len(runs),
        "win_rate_vs_sft_mean": mean(lambda r: r["evaluation"]["win_rate_vs_sft"]),
        "every_seed_ci_above_half": all(r["evaluation"]["win_rate_vs_sft_ci"][0] > 0.5 for r in runs),
        "judge_diff_vs_sft_mean": mean(lambda r: r["evaluation"]["judge_diff_vs_sft"]),
        "kl_mean": mean(lambda r: r["evaluation"]["ppo/kl_k1_seq"]),
        "ppo_beats_best_of_n_every_seed": all(beats_best_of_n(r["evaluation"]) for r in runs),
        "dpo_win_rate_vs_sft_mean": mean(lambda r: r["evaluation"]["dpo_win_rate_vs_sft"]),
        "ppo_above_dpo_every_seed": all(
            r["evaluation"]["dpo_win_rate_vs_sft"] is None
            or r["evaluation"]["win_rate_vs_sft"] > r["evaluation"]["dpo_win_rate_vs_sft"]
            for r in runs
        ),
        "overoptimisation_flags": sum(bool(r["evaluation"]["overoptimisation"]) for r in runs),
        "rm_on_policy_accuracy_mean": mean(lambda r: r["reward"]["on_policy_accuracy"]),
        "labels_gold_agreement_test_mean": mean(lambda r: r["labels_gold_agreement_test"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dpo", action="store_true", help="also train and grade DPO on the same labels")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/onpolicy_results.json")
    parser.add_argument("--reuse", action="store_true", help="keep what an earlier run trained; evaluate again")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params, e.g. ppo.kl_coef=0.2")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks/onpolicy_runs", help="where seeds train")
    parser.add_argument(
        "--rm-from", type=Path, help="an earlier --runs folder: its comparisons and reward models, PPO anew (a sweep)"
    )
    parser.add_argument(
        "--gold-reward",
        action="store_true",
        help="PPO climbs the gold judge instead of the reward model (benchmarks/gold_reward_ppo.py): the RM's cost",
    )
    args = parser.parse_args()
    global REUSE, RM_FROM
    REUSE, RM_FROM = args.reuse, args.rm_from
    if args.gold_reward:  # on another run's reward models, in a folder of its own (its checkpoints, its PPO)
        if not args.rm_from or args.rm_from.resolve() == args.runs.resolve():
            parser.error("--gold-reward needs --rm-from FOLDER and a --runs folder other than FOLDER")
        MODULES["ppo"] = "benchmarks.gold_reward_ppo"
    OVERRIDES.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    project = args.project.resolve()
    runs = []
    for seed in args.seeds:
        out = args.runs.resolve() / f"seed_{seed}"
        if RM_FROM:
            out.mkdir(parents=True, exist_ok=True)
            for name in SHARED:
                if not (out / name).exists():
                    (out / name).symlink_to((RM_FROM / f"seed_{seed}" / name).resolve())
        runs.append(one(project, out, seed, args.dpo))
        if not runs[-1]["gate_passed"]:
            print(f"seed {seed}: {runs[-1]['gate']}", flush=True)
            continue
        e = runs[-1]["evaluation"]
        print(
            f"seed {seed}: win-rate {e['win_rate_vs_sft']:.3f} {e['win_rate_vs_sft_ci']}, diff "
            f"{e['judge_diff_vs_sft']:+.3f}, KL {e['ppo/kl_k1_seq']:.2f}, beats matched best-of-n: "
            f"{e['ppo_beats_matched_bon']}",
            flush=True,
        )
    params = overridden(yaml.safe_load((project / "params.yaml").read_text()))
    result = {
        "what": "the RLHF half of the default pipeline (comparisons, reward, reward_gate, ppo, dpo, evaluate) per seed "
        "on the project's SFT model and data, graded by the gold judge on every distinct held-out prompt",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "command": "benchmarks/onpolicy.py " + " ".join(sys.argv[1:]),
        "params": {k: params[k] for k in ("comparisons", "reward", "ppo", "evaluate", "promote")},
        "summary": summarise(runs),
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

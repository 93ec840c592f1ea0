"""The reward model on a pretrained base against the tiny model's, on the same dialogue split.

    git clone . /tmp/real && cd /tmp/real && make setup && make run-real      # the real profile's own run
    .venv/bin/python benchmarks/reward_real.py --project /tmp/real

The real profile's run has already trained SmolLM2-135M-Instruct's reward model (artifacts/reward/metrics.json) on
its validated split (artifacts/validate/data). This trains the tiny model's, exactly as `make run` would (params.yaml's
sft and reward sections: the 3M GPT-2 built from scratch, SFT on the same demonstrations, Bradley-Terry on the same
pairs), with the real profile's context (max_length) so both see the same tokens' worth of dialogue, twice: on as many
training pairs as the pretrained model saw, and on every training pair there is (the tiny model's best case, it is
cheap). Same held-out pairs for all three. Reports each accuracy with its Wilson 95% interval and the differences with
Newcombe's interval (unpaired: conservative for the same pairs). Writes benchmarks/reward_real_results.json with the
CPU (stages.lib.environment.cpu_model).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from stages.lib.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
Z = 1.959964


def wilson(k: float, n: int) -> tuple[float, float]:
    """Wilson's 95% interval for k successes in n."""
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def newcombe(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """Newcombe's 95% interval for p1 - p2 from the two Wilson intervals (method 10)."""
    l1, u1 = wilson(p1 * n1, n1)
    l2, u2 = wilson(p2 * n2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def stage(params: Path, name: str, *args: str) -> float:
    """One stage of this checkout as a process (the project only supplies the data); its wall seconds."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", f"stages.{name}", "--params", str(params), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return round(time.monotonic() - start, 1)


def tiny(project: Path, out: Path, pairs: int | None, max_length: int, empty: Path) -> dict:
    """The tiny model's SFT and reward model on the project's validated split, as `make run` trains them."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the default pipeline's model and schedule
    params["data"] = yaml.safe_load((project / "params.yaml").read_text())["data"]
    for section in ("sft", "reward"):
        params[section]["max_length"] = max_length
    params["reward"]["offline_pairs"] = pairs
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = str(project / "artifacts/validate/data")
    seconds = {"sft": stage(out / "params.yaml", "sft", "--data", data, "--out", str(out / "sft"))}
    seconds["reward"] = stage(
        out / "params.yaml", "reward", "--data", data, "--sft", str(out / "sft/model"),
        "--comparisons", str(empty), "--out", str(out / "reward"),
    )  # fmt: skip
    return {**json.loads((out / "reward/metrics.json").read_text()), "stage_seconds": seconds}


def summary(name: str, m: dict) -> dict:
    lo, hi = wilson(m["accuracy"] * m["n_test"], m["n_test"])
    return {
        "model": name,
        "n_train": m["n_train"],
        "n_test": m["n_test"],
        "accuracy": m["accuracy"],
        "ci95": [round(lo, 4), round(hi, 4)],
        "gold_pair_accuracy": m.get("gold_pair_accuracy"),
        "train_seconds": m.get("train_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project where `make run-real` has run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/reward_real_runs")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/reward_real_results.json")
    args = parser.parse_args()
    project = args.project.resolve()
    real_params = yaml.safe_load((project / "params.yaml").read_text())
    real = json.loads((project / "artifacts/reward/metrics.json").read_text())
    empty = args.out / "no_comparisons"  # the real profile labels no on-policy comparisons: offline pairs only
    empty.mkdir(parents=True, exist_ok=True)
    for f in ("preferences.jsonl", "preferences_test.jsonl", "replies_test.jsonl"):
        (empty / f).write_text("")
    (empty / "metrics.json").write_text(json.dumps({"labeler": "none", "round": 1, "train_pairs": 0}))
    max_length = real_params["reward"]["max_length"]
    rows = [summary(real_params["sft"]["model"], real)]
    for label, pairs in (("same_pairs", real["n_train"]), ("all_pairs", None)):
        m = tiny(project, args.out / f"tiny_{label}", pairs, max_length, empty)
        rows.append(summary("tiny-gpt2", m) | {"stage_seconds": m["stage_seconds"]})
    p1, n1 = real["accuracy"], real["n_test"]
    for row in rows[1:]:
        lo, hi = newcombe(p1, n1, row["accuracy"], row["n_test"])
        row["pretrained_minus_this"] = {"points": round(100 * (p1 - row["accuracy"]), 1), "ci95_points": [
            round(100 * lo, 1), round(100 * hi, 1)]}  # fmt: skip
    results = {
        "what": "reward-model held-out accuracy on the real profile's dialogue split: pretrained base vs tiny model",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "command": "benchmarks/reward_real.py --project <a project after make run-real>",
        "max_length": max_length,
        "pretrained_reward": {k: real_params["reward"][k] for k in ("lora", "offline_pairs", "learning_rate")},
        "rows": rows,
    }
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Reward-model stage: a scalar head on the SFT backbone, trained with the Bradley-Terry loss on the preference pairs.

    loss = -log sigmoid(r_chosen - r_rejected - margin)        (Ouyang et al. 2022, eq. 1; TRL's RewardTrainer)

It measures the trained model on held-out pairs (accuracy against the labels, calibration by reward gap and, on the
default task, agreement with the gold judge) and writes the normalisation statistics PPO and evaluation use
(stages/lib/reward_training.py). Whether those numbers are good enough to go on is the next stage's question
(stages/reward_gate.py), so changing the gate's thresholds never retrains this model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.lib.io import read_jsonl
from stages.lib.modeling import use_hardware
from stages.lib.outcome import ArgumentParser, stage_main
from stages.lib.params import config_from, load_params
from stages.lib.reward_training import RewardConfig, build, training_pairs
from stages.lib.tracking import Tracker, mlflow_run


def run(
    config: RewardConfig,
    data_dir: Path,
    sft_dir: Path,
    comparisons: list[Path],
    out_dir: Path,
    tracker: Tracker,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Train the RM on the offline pairs and the on-policy comparisons; measure it on preferences_test.jsonl and on the
    newest round's held-out comparisons; write everything to `out_dir`."""
    train_rows, test_rows = (
        training_pairs(config, data_dir, comparisons),
        read_jsonl(data_dir / "preferences_test.jsonl"),
    )
    norm_prompts = [r["prompt"] for r in read_jsonl(data_dir / "prompts.jsonl")]
    latest = comparisons[-1] if comparisons else None
    on_policy = (
        (read_jsonl(latest / "preferences_test.jsonl"), read_jsonl(latest / "replies_test.jsonl"))
        if latest
        else ([], [])
    )
    return build(config, train_rows, test_rows, norm_prompts, sft_dir, out_dir, tracker, precision, on_policy=on_policy)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.reward", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data", help="validated datasets")
    parser.add_argument("--sft", default="artifacts/sft/model", help="the SFT model (backbone of the RM)")
    parser.add_argument(
        "--comparisons",
        action="append",
        default=[],
        help="a comparisons stage's output (repeatable: every round so far, oldest first)",
    )
    parser.add_argument("--out", default="artifacts/reward")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(RewardConfig, params.get("reward"))
    precision = use_hardware(params).precision
    comparisons = [Path(c) for c in args.comparisons]
    with mlflow_run("reward") as tracker:
        metrics = run(config, Path(args.data), Path(args.sft), comparisons, Path(args.out), tracker, precision)
    on_policy = metrics["on_policy_accuracy"]
    print(
        f"reward model: held-out accuracy {metrics['accuracy']:.3f}"
        + (f", on the policy's own replies {on_policy:.3f}" if on_policy is not None else "")
        + f"; saved to {args.out}/model"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("reward", main))

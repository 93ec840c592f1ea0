"""Judge stage: who grades the policy, independently of the reward model PPO climbs (stages/lib/judge.py).

On the default task the judge is its gold function and this stage only records that. On a user's own data (or with
`judge.kind: reward_model`) it trains a *judge reward model* like the reward model, on the pairs the validation stage
set aside for it (a disjoint part of the training prompts) with its own seed: the "gold reward model" of Gao et al.
2022. With `scorer` or `endpoint` it records the user's judge. Evaluation, the over-optimisation monitor and promotion
load whichever judge `<out>/model/judge.json` names.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from stages.lib.io import read_jsonl, write_json
from stages.lib.judge import JudgeConfig
from stages.lib.modeling import use_hardware
from stages.lib.outcome import ArgumentParser, BadInput, stage_main
from stages.lib.params import config_from, load_params
from stages.lib.reward_training import RewardConfig, build
from stages.lib.splits import JUDGE
from stages.lib.tracking import Tracker, mlflow_run


def run(
    config: JudgeConfig,
    training: RewardConfig,
    data_dir: Path,
    sft_dir: Path,
    out_dir: Path,
    tracker: Tracker,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Write the judge to `out_dir/model` (judge.json, plus the judge reward model's weights and norm.json) and its
    numbers to `out_dir/metrics.json`."""
    kind = json.loads((data_dir / "derived.json").read_text())["judge"]  # decided once, where the data was split
    spec: dict[str, Any] = {"kind": kind}
    metrics: dict[str, Any] = {"kind": kind}
    tracker.log_params({"judge": dataclasses.asdict(config), "judge_kind": kind})
    if kind == "reward_model":
        if not (data_dir / f"{JUDGE}.jsonl").exists():
            raise BadInput(f"the judge reward model has no pairs: {data_dir / JUDGE}.jsonl is missing")
        rows, test_rows = read_jsonl(data_dir / f"{JUDGE}.jsonl"), read_jsonl(data_dir / "preferences_test.jsonl")
        norm_prompts = [r["prompt"] for r in read_jsonl(data_dir / "prompts.jsonl")]
        trained = build(
            dataclasses.replace(training, seed=config.seed, ensemble=1),
            rows,
            test_rows,
            norm_prompts,
            sft_dir,
            out_dir / "model",
            tracker,
            precision,
            name="judge",
        )
        metrics |= {
            "accuracy": trained["accuracy"],
            "n_train": trained["n_train"],
            "seed": config.seed,
            "train_seconds": trained["train_seconds"],
        }
    elif kind == "scorer":
        spec["scorer"] = config.scorer
    elif kind == "endpoint":
        spec |= {"endpoint": config.endpoint, "endpoint_model": config.endpoint_model, "timeout": config.timeout}
    write_json(out_dir / "model" / "judge.json", spec)
    write_json(out_dir / "metrics.json", metrics)
    tracker.set_tags({"rlhf.judge": kind})
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.judge", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data", help="validated datasets (and derived.json)")
    parser.add_argument("--sft", default="artifacts/sft/model", help="the SFT model (backbone of a judge RM)")
    parser.add_argument("--out", default="artifacts/judge")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(JudgeConfig, params.get("judge"))
    training = config_from(RewardConfig, params.get("reward"))
    precision = use_hardware(params).precision
    with mlflow_run("judge") as tracker:
        metrics = run(config, training, Path(args.data), Path(args.sft), Path(args.out), tracker, precision)
    accuracy = f"; held-out accuracy {metrics['accuracy']:.3f}" if "accuracy" in metrics else ""
    print(f"judge: {metrics['kind']}{accuracy}; saved to {args.out}/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("judge", main))

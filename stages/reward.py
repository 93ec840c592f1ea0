"""Reward-model stage: a scalar head on the SFT backbone, Bradley-Terry loss on preference pairs, and the agreement gate.

    loss = -log sigmoid(r_chosen - r_rejected - margin)        (Ouyang et al. 2022, eq. 1; TRL's RewardTrainer)

The gate is the seeds' rule of thumb made automatic: if the reward model agrees with held-out human labels less than
it should, PPO would climb a bad proxy, so the pipeline stops here. "Should" is both an absolute floor
(`min_agreement`) and the simulated labeler's own agreement with the gold judge on the same pairs (its ceiling: a
perfect reward model cannot agree with noisy labels more often than the labels agree with the truth).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages import task
from stages.io import read_jsonl, write_json
from stages.modeling import (
    LoraSettings,
    context_limit,
    generate,
    load_causal_lm,
    peft_config,
    resolve_precision,
    seed_everything,
    trainer_precision,
)
from stages.params import config_from, load_params, stage_main
from stages.plots import bar_plot, line_plot
from stages.tracking import Tracker, mlflow_run, trainer_callback

EXIT_GATE = 2


@dataclass(frozen=True)
class RewardConfig:
    """params.yaml: reward."""

    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 3e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    margin: float = 0.0  # constant margin in the Bradley-Terry loss (0: plain BT)
    center_rewards_coefficient: float = 0.01  # keeps rewards centred at 0 (Eisenstein et al. 2023)
    max_length: int = 128
    gradient_checkpointing: bool = False
    lora: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    logging_steps: int = 10
    calibration_bins: int = 5
    n_norm_samples: int = 128  # SFT replies to PPO prompts, scored for the reward normalisation statistics
    max_new_tokens: int = 48
    gate: dict[str, float] = field(default_factory=dict)  # GateConfig


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the agreement gate (params.yaml: reward.gate)."""

    min_agreement: float = 0.6  # held-out pairwise accuracy against the labels
    max_gap_to_ceiling: float = 0.05  # ... and at most this far below the labeler's own agreement with gold
    min_rank_agreement: float = 0.3  # Spearman of RM score vs gold score on held-out replies (default task only)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict: the flow, the logs, metrics.json and the MLflow tags all carry `reason`."""

    passed: bool
    reason: str
    numbers: dict[str, float | None]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), averaged over pairs. Shapes (B,), (B,) -> ()."""
    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected - margin).mean()


def agreement_gate(accuracy: float, ceiling: float | None, rank_agreement: float | None, gate: GateConfig) -> GateResult:
    """Pass when the RM agrees with held-out labels well enough: above the floor and near the labeler's ceiling."""
    numbers = {"accuracy": accuracy, "labeler_ceiling": ceiling, "rank_agreement_gold": rank_agreement,
               "min_agreement": gate.min_agreement, "max_gap_to_ceiling": gate.max_gap_to_ceiling,
               "min_rank_agreement": gate.min_rank_agreement}  # fmt: skip
    failures = []
    if accuracy < gate.min_agreement:
        failures.append(f"held-out accuracy {accuracy:.3f} < min_agreement {gate.min_agreement:.3f}")
    if ceiling is not None and accuracy < ceiling - gate.max_gap_to_ceiling:
        failures.append(f"held-out accuracy {accuracy:.3f} is more than {gate.max_gap_to_ceiling:.2f} below the "
                        f"labeler's ceiling {ceiling:.3f}")  # fmt: skip
    if rank_agreement is not None and rank_agreement < gate.min_rank_agreement:
        failures.append(f"rank agreement with the gold judge {rank_agreement:.3f} < {gate.min_rank_agreement:.3f}")
    if failures:
        return GateResult(False, "reward-model gate failed: " + "; ".join(failures), numbers)
    ceiling_txt = f" (labeler ceiling {ceiling:.3f})" if ceiling is not None else ""
    return GateResult(True, f"reward-model gate passed: held-out accuracy {accuracy:.3f}{ceiling_txt}", numbers)


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], replies: list[str], max_length: int, batch_size: int = 64) -> list[float]:
    """RM scores of `prompt + " " + reply + EOS`: exactly the text the RM was trained on."""
    model.eval()
    texts = [f"{p} {r}{tokenizer.eos_token}" for p, r in zip(prompts, replies, strict=True)]
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)  # fmt: skip
        out += model(**enc).logits[:, 0].tolist()
    return out


def calibration(gaps: list[float], correct: list[bool], bins: int) -> list[dict[str, float]]:
    """Accuracy by |reward gap| quantile bin: a calibrated RM is right more often when it is more confident."""
    order = sorted(range(len(gaps)), key=lambda i: abs(gaps[i]))
    rows = []
    for b in range(bins):
        idx = order[b * len(order) // bins : (b + 1) * len(order) // bins]
        if idx:
            rows.append({"gap_low": abs(gaps[idx[0]]), "gap_high": abs(gaps[idx[-1]]), "n": len(idx),
                         "accuracy": sum(correct[i] for i in idx) / len(idx)})  # fmt: skip
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    value = pd.Series(a).rank().corr(pd.Series(b).rank())
    return 0.0 if math.isnan(value) else float(value)


def run(config: RewardConfig, data_dir: Path, sft_dir: Path, out_dir: Path, tracker: Tracker,
        labeler_file: Path | None = None, precision: str = "fp32") -> tuple[dict[str, Any], GateResult]:  # fmt: skip
    """Train the RM, measure it, apply the gate. Writes everything to `out_dir` (also when the gate fails)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    seed_everything(config.seed)
    gate = GateConfig(**config.gate)
    train_rows, test_rows = read_jsonl(data_dir / "preferences.jsonl"), read_jsonl(data_dir / "preferences_test.jsonl")
    tracker.log_params({"reward": asdict(config), "n_train": len(train_rows), "n_test": len(test_rows),
                        "precision": precision})
    policy, gen_tokenizer = load_causal_lm(sft_dir)  # left-padded, for sampling
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="right")  # the RM's
    model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    max_length = context_limit(model, config.max_length)

    # 1. Bradley-Terry training (TRL appends EOS and reads the score at the last token)
    def as_dataset(rows: list[dict[str, str]]) -> Dataset:
        data = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows]
        if config.margin:
            data = [{**d, "margin": config.margin} for d in data]
        return Dataset.from_list(data)

    with tempfile.TemporaryDirectory() as scratch:
        args = TrlRewardConfig(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size, learning_rate=config.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, max_length=max_length,
            center_rewards_coefficient=config.center_rewards_coefficient or None,
            gradient_checkpointing=config.gradient_checkpointing, logging_steps=config.logging_steps,
            eval_strategy="epoch", save_strategy="no", report_to="none", seed=config.seed, data_seed=config.seed,
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=False, **trainer_precision(precision),
        )  # fmt: skip
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=as_dataset(train_rows), eval_dataset=as_dataset(test_rows),
            processing_class=tokenizer, peft_config=peft_config(LoraSettings(**config.lora), "SEQ_CLS", model),
            callbacks=[trainer_callback(tracker, "reward/")],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        history = trainer.state.log_history
    model = trainer.model.merge_and_unload() if config.lora.get("enabled") else trainer.model

    # 2. held-out agreement with the labels, calibration, and (default task) agreement with the gold judge
    prompts = [r["prompt"] for r in test_rows]
    r_c = score(model, tokenizer, prompts, [r["chosen"] for r in test_rows], max_length)
    r_r = score(model, tokenizer, prompts, [r["rejected"] for r in test_rows], max_length)
    gaps = [c - r for c, r in zip(r_c, r_r, strict=True)]
    correct = [g > 0 for g in gaps]
    accuracy = sum(correct) / len(correct)
    bins = calibration(gaps, correct, config.calibration_bins)
    rank_agreement = gold_accuracy = None
    if task.judge_applies(prompts):
        g_c = [task.gold_score(r["prompt"], r["chosen"]) for r in test_rows]
        g_r = [task.gold_score(r["prompt"], r["rejected"]) for r in test_rows]
        rank_agreement = spearman(r_c + r_r, g_c + g_r)
        decided = [(g > 0) == (x > 0) for g, x in zip([c - r for c, r in zip(g_c, g_r, strict=True)], gaps, strict=True)
                   if g != 0]  # fmt: skip
        gold_accuracy = sum(decided) / max(1, len(decided))
    ceiling = None
    if labeler_file is not None and labeler_file.exists():
        ceiling = json.loads(labeler_file.read_text()).get("labeler_ceiling_test")
    result = agreement_gate(accuracy, ceiling, rank_agreement, gate)

    # 3. normalisation statistics for PPO: RM scores of SFT replies to PPO prompts (the policy's starting distribution)
    ppo_prompts = [r["prompt"] for r in read_jsonl(data_dir / "prompts.jsonl")][: config.n_norm_samples]
    replies, _ = generate(policy, gen_tokenizer, ppo_prompts, config.max_new_tokens, seed=config.seed)
    ref_scores = torch.tensor(score(model, tokenizer, ppo_prompts, replies, max_length))
    norm = {"mean": ref_scores.mean().item(), "std": ref_scores.std().clamp_min(1e-6).item(), "n": len(ref_scores)}

    # 4. save: model, stats, plots, metrics with the gate's verdict
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")
    write_json(out_dir / "norm.json", norm)
    write_json(out_dir / "calibration.json", bins)  # DVC plots read JSON, not JSON lines
    bar_plot([f"{b['gap_low']:.2f}-{b['gap_high']:.2f}" for b in bins], [b["accuracy"] for b in bins],
             "RM calibration: held-out accuracy by |reward gap|", "accuracy", out_dir / "calibration.png",
             reference=ceiling, counts=[b["n"] for b in bins])  # fmt: skip
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    train_acc = [(h["step"], h["accuracy"]) for h in history if "accuracy" in h and "loss" in h]
    eval_acc = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    line_plot({"train loss": tuple(zip(*losses, strict=False))}, "RM Bradley-Terry loss", "step", "loss", out_dir / "loss.png")
    line_plot({"train": tuple(zip(*train_acc, strict=False)), "held-out": tuple(zip(*eval_acc, strict=False))}, "RM pairwise accuracy", "step",
              "accuracy", out_dir / "accuracy.png")  # fmt: skip
    metrics = {"accuracy": round(accuracy, 4), "labeler_ceiling": ceiling, "rank_agreement_gold": rank_agreement,
               "gold_pair_accuracy": gold_accuracy, "train_seconds": round(train_seconds, 2),
               "reward_mean": norm["mean"], "reward_std": norm["std"], "precision": precision,
               "gate": {"passed": result.passed, "reason": result.reason}}  # fmt: skip
    write_json(out_dir / "metrics.json", metrics)

    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    tracker.set_tags({"rlhf.gate": "passed" if result.passed else "failed", "rlhf.gate_reason": result.reason,
                      "rlhf.precision": precision})
    for name in ("metrics.json", "norm.json", "calibration.png", "loss.png", "accuracy.png", "model"):
        tracker.log_artifact(out_dir / name, "model" if name == "model" else None)
    return metrics, result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.reward", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data", help="validated datasets")
    parser.add_argument("--sft", default="artifacts/sft/model", help="the SFT model (backbone of the RM)")
    parser.add_argument("--labeler", default="data/labeler.json", help="the simulated labeler's statistics, if any")
    parser.add_argument("--out", default="artifacts/reward")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(RewardConfig, params.get("reward"))
    precision = resolve_precision(params.get("precision", "auto"))
    with mlflow_run("reward") as tracker:
        metrics, result = run(config, Path(args.data), Path(args.sft), Path(args.out), tracker, Path(args.labeler),
                              precision)
    if not result.passed:
        print(result.reason, file=sys.stderr)
        return EXIT_GATE
    print(f"{result.reason}; saved to {args.out}/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main(main))

"""Training and measuring a reward model: what the reward stage and the judge stage (a second, independent reward
model) share.

    loss = -log sigmoid(r_chosen - r_rejected - margin)        (Ouyang et al. 2022, eq. 1; TRL's RewardTrainer)

A reward model is a scalar head on the SFT backbone, trained on `prompt + " " + reply + EOS` pairs fitted to the
context budget. Measured on held-out pairs: accuracy against the labels, calibration by reward gap and, on the
default task, agreement with the gold judge. Its normalisation statistics (norm.json) are the scores of SFT replies
to PPO prompts, the policy's starting distribution.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from stages.lib import gold
from stages.lib.context import fit_pairs, reply_prefix
from stages.lib.io import read_jsonl, write_json
from stages.lib.modeling import (
    LoraSettings,
    context_limit,
    current_device,
    generate,
    keep_context,
    load_causal_lm,
    peft_config,
    seed_everything,
    trainer_device,
    trainer_precision,
)
from stages.lib.outcome import BadInput
from stages.lib.params import AT_LEAST_ONE, FINITE, FRACTION, NON_NEGATIVE, POSITIVE, Allowed
from stages.lib.plots import bar_plot, line_plot
from stages.lib.rewards import RewardEnsemble, RewardModel, norm_of
from stages.lib.tracking import Tracker, trainer_callback


@dataclass(frozen=True)
class RewardConfig:
    """params.yaml: reward."""

    epochs: float
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    margin: float  # constant margin in the Bradley-Terry loss (0: plain BT)
    center_rewards_coefficient: float  # keeps rewards centred at 0 (Eisenstein et al. 2023)
    max_length: int
    gradient_checkpointing: bool
    group_by_length: bool  # batches of similar length (HF's LengthGroupedSampler): far less padding
    lora: LoraSettings
    seed: int
    logging_steps: int
    calibration_bins: int
    n_norm_samples: int  # SFT replies to PPO prompts, scored for the reward normalisation statistics
    max_new_tokens: int
    offline_pairs: int | None  # the first N offline training pairs (null: all of them) ...
    label_budget: int  # ... plus every on-policy comparison: the labels the reward model may train on, at most
    ensemble: int  # reward models on these labels: the first on all of them, each other on a bootstrap resample

    SECTION: ClassVar[str] = "reward"
    RANGES: ClassVar[dict] = {
        "epochs": POSITIVE,
        "batch_size": AT_LEAST_ONE,
        "learning_rate": POSITIVE,
        "warmup_ratio": FRACTION,
        "weight_decay": NON_NEGATIVE,
        "margin": FINITE,
        "center_rewards_coefficient": NON_NEGATIVE,
        "max_length": AT_LEAST_ONE,
        "seed": NON_NEGATIVE,
        "logging_steps": AT_LEAST_ONE,
        "calibration_bins": AT_LEAST_ONE,
        "n_norm_samples": Allowed(2),  # a standard deviation needs two
        "max_new_tokens": AT_LEAST_ONE,
        "offline_pairs": NON_NEGATIVE,
        "label_budget": NON_NEGATIVE,
        "ensemble": AT_LEAST_ONE,
    }


def training_pairs(config: RewardConfig, data_dir: Path, comparisons: list[Path]) -> list[dict]:
    """The labelled pairs a reward model (or DPO, on the same labels) trains on: the first `offline_pairs` offline
    training pairs plus every round's on-policy comparisons; BadInput when together they are more labels than
    `label_budget` (labels are what a team pays for)."""
    offline = read_jsonl(data_dir / "preferences.jsonl")[: config.offline_pairs]
    on_policy = [row for c in comparisons for row in read_jsonl(c / "preferences.jsonl")]
    labelled = len(offline) + sum(json.loads((c / "metrics.json").read_text())["train_pairs"] for c in comparisons)
    if labelled > config.label_budget:
        raise BadInput(
            f"the reward model would train on {labelled} labelled pairs ({len(offline)} offline + on-policy "
            f"comparisons), more than reward.label_budget {config.label_budget}: lower reward.offline_pairs or "
            "comparisons.train_pairs"
        )
    return offline + on_policy


def calibration(gaps: list[float], correct: list[bool], bins: int) -> list[dict[str, float]]:
    """Accuracy by |reward gap| quantile bin: a calibrated RM is right more often when it is more confident."""
    order = sorted(range(len(gaps)), key=lambda i: abs(gaps[i]))
    rows = []
    for b in range(bins):
        idx = order[b * len(order) // bins : (b + 1) * len(order) // bins]
        if idx:
            rows.append(
                {
                    "gap_low": abs(gaps[idx[0]]),
                    "gap_high": abs(gaps[idx[-1]]),
                    "n": len(idx),
                    "accuracy": sum(correct[i] for i in idx) / len(idx),
                }
            )
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    value = pd.Series(a).rank().corr(pd.Series(b).rank())
    return 0.0 if math.isnan(value) else float(value)


def _length_grouped(trainer_cls: type) -> type:
    """`trainer_cls` drawing batches of similar length (HF's LengthGroupedSampler, by the longer side of each pair):
    far fewer padding tokens than random batches. TRL's RewardTrainer has no such option (its pairs are not `input_ids`
    rows), so the sampler is given here."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class LengthGrouped(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202 (HF's signature)
            data = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [max(len(c), len(r)) for c, r in zip(data["chosen_ids"], data["rejected_ids"], strict=True)]
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths
            )

    return LengthGrouped


def train(
    config: RewardConfig,
    sft_dir: Path,
    train_rows: list[dict],
    test_rows: list[dict],
    tracker: Tracker,
    precision: str,
    prefix: str = "reward/",
) -> tuple[Any, Any, list[dict], float, dict[str, int]]:
    """Bradley-Terry training with TRL's RewardTrainer (it appends EOS and reads the score at the last token).
    Returns (model, tokenizer, the trainer's log history, training seconds, pairs cut to the context)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardTrainer

    LengthGroupedRewardTrainer = _length_grouped(RewardTrainer)  # noqa: N806 (a class)

    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id

    max_length = context_limit(model, config.max_length)
    sep = reply_prefix(tokenizer)
    truncated: dict[str, int] = {}

    def as_dataset(rows: list[dict[str, str]], split: str) -> Dataset:
        # the context budget: each reply keeps its start, the shared prompt its last turns (TRL appends the EOS)
        fitted = fit_pairs(
            tokenizer,
            [r["prompt"] for r in rows],
            [[r["chosen"] for r in rows], [r["rejected"] for r in rows]],
            max_length,
        )
        truncated.update(fitted.counts(f"{split}_"))
        data = [
            {"prompt": p, "chosen": sep + c, "rejected": sep + r}
            for p, c, r in zip(fitted.prompts, *fitted.replies, strict=True)
        ]
        if config.margin:
            data = [{**d, "margin": config.margin} for d in data]
        return Dataset.from_list(data)

    with tempfile.TemporaryDirectory() as scratch:
        args = trainer_arguments(config, scratch, max_length, precision)
        trainer = (LengthGroupedRewardTrainer if config.group_by_length else RewardTrainer)(
            model=model,
            args=args,
            train_dataset=as_dataset(train_rows, "train"),
            eval_dataset=as_dataset(test_rows, "test"),
            processing_class=tokenizer,
            peft_config=peft_config(config.lora, "SEQ_CLS", model),
            callbacks=[trainer_callback(tracker, prefix)],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model = trainer.model.merge_and_unload() if config.lora.enabled else trainer.model
    return model, tokenizer, trainer.state.log_history, seconds, truncated


def trainer_arguments(config: RewardConfig, scratch: str, max_length: int, precision: str) -> Any:
    """TRL's RewardConfig for this stage: the schedule, the context, the device and precision (stages/lib/modeling)."""
    from trl import RewardConfig as TrlRewardConfig

    return TrlRewardConfig(
        output_dir=scratch,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_length=max_length,
        center_rewards_coefficient=config.center_rewards_coefficient or None,
        gradient_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        # held-out accuracy after each epoch only when there are several (the curve): `measure` scores the held-out
        # pairs once training ends (for a 135M model on 2 cores one held-out pass costs as much as ~150 training pairs)
        eval_strategy="epoch" if config.epochs > 1 else "no",
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        **trainer_device(current_device().type),
        dataloader_num_workers=0,
        disable_tqdm=False,
        **trainer_precision(precision),
    )


def measure(rm: RewardModel, test_rows: list[dict], max_length: int, bins: int) -> dict[str, Any]:
    """Held-out agreement with the labels, calibration by |reward gap| and, on the default task, agreement with the
    gold judge: rank correlation over all replies, and accuracy on the pairs the gold judge does not tie."""
    prompts = [r["prompt"] for r in test_rows]
    r_c = rm.score_texts(prompts, [r["chosen"] for r in test_rows], max_length)
    r_r = rm.score_texts(prompts, [r["rejected"] for r in test_rows], max_length)
    gaps = [c - r for c, r in zip(r_c, r_r, strict=True)]
    correct = [g > 0 for g in gaps]
    out: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct),
        "calibration": calibration(gaps, correct, bins),
        "rank_agreement_gold": None,
        "gold_pair_accuracy": None,
    }
    if gold.judge_applies(prompts):
        g_c = [gold.gold_score(r["prompt"], r["chosen"]) for r in test_rows]
        g_r = [gold.gold_score(r["prompt"], r["rejected"]) for r in test_rows]
        out["rank_agreement_gold"] = spearman(r_c + r_r, g_c + g_r)
        decided = [
            (g > 0) == (x > 0)
            for g, x in zip([c - r for c, r in zip(g_c, g_r, strict=True)], gaps, strict=True)
            if g != 0
        ]
        out["gold_pair_accuracy"] = sum(decided) / max(1, len(decided))
    return out


def measure_on_policy(
    rm: RewardModel, test_rows: list[dict], replies_rows: list[dict], max_length: int
) -> dict[str, float | int | None]:
    """The reward model on the policy's own replies (stages/comparisons.py): accuracy on held-out labelled pairs, and
    on the default task the gold gain of its best-of-n pick among each held-out prompt's replies over their mean
    (beside the most a perfect ranker could gain there). None where there is nothing to measure."""
    out: dict[str, float | int | None] = {
        "on_policy_accuracy": None,
        "on_policy_gold_pair_accuracy": None,
        "on_policy_n_test": len(test_rows),
        "bon_n": None,
        "bon_gold_gain": None,
        "bon_gold_headroom": None,
    }
    if test_rows:
        measured = measure(rm, test_rows, max_length, 1)
        out["on_policy_accuracy"] = round(measured["accuracy"], 4)
        out["on_policy_gold_pair_accuracy"] = measured["gold_pair_accuracy"]
    rows = [r for r in replies_rows if len(r["replies"]) > 1]
    if rows and gold.judge_applies([r["prompt"] for r in rows]):
        prompts = [r["prompt"] for r in rows for _ in r["replies"]]
        replies = [reply for r in rows for reply in r["replies"]]
        scores = iter(rm.score_texts(prompts, replies, max_length))
        gains, headroom = [], []
        for r in rows:
            golds = [gold.gold_score(r["prompt"], reply) for reply in r["replies"]]
            rm_scores = [next(scores) for _ in golds]
            picked = max(range(len(golds)), key=rm_scores.__getitem__)
            mean = sum(golds) / len(golds)
            gains.append(golds[picked] - mean)
            headroom.append(max(golds) - mean)
        out["bon_n"] = len(rows[0]["replies"])
        out["bon_gold_gain"] = round(sum(gains) / len(gains), 4)
        out["bon_gold_headroom"] = round(sum(headroom) / len(headroom), 4)
    return out


def build(
    config: RewardConfig,
    train_rows: list[dict],
    test_rows: list[dict],
    norm_prompts: list[str],
    sft_dir: Path,
    out_dir: Path,
    tracker: Tracker,
    precision: str = "fp32",
    name: str = "reward",
    on_policy: tuple[list[dict], list[dict]] = ([], []),
) -> dict[str, Any]:
    """Train a reward model on `train_rows` and measure it on `test_rows` and, when given, on the policy's own
    replies (`on_policy`: held-out labelled pairs and each held-out prompt's replies, see `measure_on_policy`);
    writes the model, norm.json (scores of SFT replies to `norm_prompts`), calibration, plots and metrics.json to
    `out_dir`. Returns the metrics."""
    seed_everything(config.seed)
    tracker.log_params(
        {name: asdict(config), "n_train": len(train_rows), "n_test": len(test_rows), "precision": precision}
    )
    policy, gen_tokenizer = load_causal_lm(sft_dir)  # left-padded, for sampling

    # 1. Bradley-Terry training
    model, tokenizer, history, train_seconds, truncated = train(
        config, sft_dir, train_rows, test_rows, tracker, precision, f"{name}/"
    )
    rm = RewardModel(model, tokenizer)

    # 2. held-out agreement with the labels, calibration, agreement with the gold judge (default task)
    measured = measure(rm, test_rows, context_limit(model, config.max_length), config.calibration_bins)
    bins = measured.pop("calibration")
    on_policy_measured = measure_on_policy(rm, *on_policy, context_limit(model, config.max_length))

    # 3. normalisation statistics for PPO: RM scores of SFT replies to PPO prompts (the policy's starting distribution)
    ppo_prompts = norm_prompts[: config.n_norm_samples]
    replies = generate(policy, gen_tokenizer, ppo_prompts, config.max_new_tokens, seed=config.seed).replies
    ref_scores = torch.tensor(rm.score_texts(ppo_prompts, replies, context_limit(model, config.max_length)))
    norm = norm_of(ref_scores)

    # 4. save: model, stats, plots, metrics
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_context(tokenizer, context_limit(model, config.max_length))  # the window it is trained and normalised at
    model.save_pretrained(out_dir / "model", safe_serialization=True)
    tokenizer.save_pretrained(out_dir / "model")

    # 5. the ensemble's other members (reward.ensemble > 1), saved inside the model folder: PPO scores with all of them
    ensemble = train_members(
        config, sft_dir, train_rows, test_rows, tracker, precision, name, (ppo_prompts, replies), out_dir / "model"
    )
    if ensemble:
        members = [RewardModel(model, tokenizer, norm), *(m for m, _ in ensemble)]
        norm_z = torch.stack([members[0].normalise(ref_scores), *(z for _, z in ensemble)])  # (k, SFT replies)
        write_json(out_dir / "model" / "ensemble" / "norm_z.json", norm_z.tolist())
        limit = context_limit(model, config.max_length)
        measured_ensemble = measure_on_policy(RewardEnsemble(members, 0.0, norm_z), *on_policy, limit)
        on_policy_measured["ensemble_on_policy_accuracy"] = measured_ensemble["on_policy_accuracy"]
        on_policy_measured["ensemble_bon_gold_gain"] = measured_ensemble["bon_gold_gain"]
    write_json(out_dir / "norm.json", norm)
    write_json(out_dir / "calibration.json", bins)  # DVC plots read JSON, not JSON lines
    write_plots(out_dir, history, bins, measured["accuracy"])
    metrics = {
        "accuracy": round(measured["accuracy"], 4),
        "rank_agreement_gold": measured["rank_agreement_gold"],
        "gold_pair_accuracy": measured["gold_pair_accuracy"],
        **on_policy_measured,
        "train_seconds": round(train_seconds, 2),
        "reward_mean": norm["mean"],
        "reward_std": norm["std"],
        "precision": precision,
        "n_train": len(train_rows),
        "n_test": len(test_rows),
        **truncated,
    }
    write_json(out_dir / "metrics.json", metrics)

    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    tracker.set_tags({"rlhf.precision": precision})
    for name in ("metrics.json", "norm.json", "calibration.png", "loss.png", "accuracy.png", "model"):
        tracker.log_artifact(out_dir / name, "model" if name == "model" else None)
    return metrics


def train_members(
    config: RewardConfig,
    sft_dir: Path,
    train_rows: list[dict],
    test_rows: list[dict],
    tracker: Tracker,
    precision: str,
    name: str,
    norm_sample: tuple[list[str], list[str]],
    model_dir: Path,
) -> list[tuple[RewardModel, torch.Tensor]]:
    """Members 1..ensemble-1: each trained with seed + i on a bootstrap resample of `train_rows` (as many pairs, drawn
    with replacement), normalised on the same SFT replies as the first, saved to `model_dir/ensemble/<i>/`. Returns
    each member with its normalised scores of those replies."""
    shutil.rmtree(model_dir / "ensemble", ignore_errors=True)  # a smaller ensemble than last time leaves none behind
    members = []
    for i in range(1, config.ensemble):
        rng = random.Random(config.seed + i)
        resample = [train_rows[rng.randrange(len(train_rows))] for _ in train_rows]
        member_config = replace(config, seed=config.seed + i)
        model, tokenizer, _, _, _ = train(
            member_config, sft_dir, resample, test_rows, tracker, precision, f"{name}/member_{i}/"
        )
        rm = RewardModel(model, tokenizer)
        limit = context_limit(model, config.max_length)
        scores = torch.tensor(rm.score_texts(*norm_sample, limit))
        rm.norm = norm_of(scores)
        folder = model_dir / "ensemble" / str(i)
        model.save_pretrained(folder, safe_serialization=True)
        write_json(folder / "norm.json", rm.norm)
        members.append((rm, rm.normalise(scores)))
    return members


def write_plots(out_dir: Path, history: list[dict], bins: list[dict], accuracy: float) -> None:
    """Calibration bars, the Bradley-Terry loss and the pairwise accuracy over training steps (held-out: the epochs'
    evaluations before the last step, then `accuracy`, the final measurement)."""
    bar_plot(
        [f"{b['gap_low']:.2f}-{b['gap_high']:.2f}" for b in bins],
        [b["accuracy"] for b in bins],
        "RM calibration: held-out accuracy by |reward gap|",
        "accuracy",
        out_dir / "calibration.png",
        counts=[b["n"] for b in bins],
    )
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    train_acc = [(h["step"], h["accuracy"]) for h in history if "accuracy" in h and "loss" in h]
    eval_acc = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    last = max((h["step"] for h in history), default=0)
    eval_acc = [e for e in eval_acc if e[0] < last] + [(last, accuracy)]
    line_plot(
        {"train loss": tuple(zip(*losses, strict=False))}, "RM Bradley-Terry loss", "step", "loss", out_dir / "loss.png"
    )
    line_plot(
        {"train": tuple(zip(*train_acc, strict=False)), "held-out": tuple(zip(*eval_acc, strict=False))},
        "RM pairwise accuracy",
        "step",
        "accuracy",
        out_dir / "accuracy.png",
    )

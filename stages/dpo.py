"""DPO baseline stage: Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer, on the same
validated preference pairs and from the same SFT model PPO starts from, so the evaluation compares the two methods
with everything else equal: PPO's reward model and RL loop against DPO's one supervised loss

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with the SFT model as pi_ref. The evaluation stage grades the DPO policy with the same judge and sampling as PPO's,
and promotion may register it if it beats the PPO policy (the registry does not care how a policy was trained).
`dpo.enabled: false` skips the training (the stage then writes only its metrics, saying so).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.lib.context import fit_pairs, reply_prefix
from stages.lib.io import read_jsonl, staged_dir, write_json
from stages.lib.modeling import (
    context_limit,
    current_device,
    keep_context,
    load_causal_lm,
    seed_everything,
    trainer_device,
    trainer_precision,
    use_hardware,
)
from stages.lib.outcome import ArgumentParser, stage_main
from stages.lib.params import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, config_from, load_params
from stages.lib.reward_training import RewardConfig, training_pairs
from stages.lib.tracking import Tracker, mlflow_run, trainer_callback


@dataclass(frozen=True)
class DPOConfig:
    """params.yaml: dpo."""

    enabled: bool
    epochs: float
    batch_size: int
    learning_rate: float
    beta: float  # the KL leash: how far the implicit reward may pull the policy from the SFT reference
    warmup_ratio: float
    max_length: int
    seed: int
    logging_steps: int

    SECTION: ClassVar[str] = "dpo"
    RANGES: ClassVar[dict] = {
        "epochs": POSITIVE,
        "batch_size": AT_LEAST_ONE,
        "learning_rate": POSITIVE,
        "beta": POSITIVE,
        "warmup_ratio": FRACTION,
        "max_length": AT_LEAST_ONE,
        "seed": NON_NEGATIVE,
        "logging_steps": AT_LEAST_ONE,
    }


def train(
    config: DPOConfig, sft_dir: Path, rows: list[dict], tracker: Tracker, precision: str
) -> tuple[Any, Any, list[dict], float, dict[str, int]]:
    """TRL's DPOTrainer from the SFT model on the pairs fitted to the context. Returns (model, tokenizer, the log
    history, training seconds, pairs cut to the context)."""
    from datasets import Dataset
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    model, tokenizer = load_causal_lm(sft_dir)
    tokenizer.padding_side = "right"
    max_length = context_limit(model, config.max_length)
    sep = reply_prefix(tokenizer)
    fitted = fit_pairs(
        tokenizer, [r["prompt"] for r in rows], [[r["chosen"] for r in rows], [r["rejected"] for r in rows]], max_length
    )
    data = Dataset.from_list(
        [
            {"prompt": p, "chosen": sep + c, "rejected": sep + r}
            for p, c, r in zip(fitted.prompts, *fitted.replies, strict=True)
        ]
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = TrlDPOConfig(
            output_dir=scratch,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup_ratio,
            beta=config.beta,
            max_length=max_length,
            gradient_checkpointing=False,
            logging_steps=config.logging_steps,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=config.seed,
            data_seed=config.seed,
            **trainer_device(current_device().type),
            dataloader_num_workers=0,
            disable_tqdm=False,
            **trainer_precision(precision),
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[trainer_callback(tracker, "dpo/")],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokenizer.padding_side = "left"
    return trainer.model, tokenizer, trainer.state.log_history, seconds, fitted.counts()


def run(
    config: DPOConfig,
    data_dir: Path,
    sft_dir: Path,
    out_dir: Path,
    tracker: Tracker,
    precision: str = "fp32",
    labels: tuple[RewardConfig, list[Path]] | None = None,
) -> dict[str, Any]:
    """Train the DPO policy into `out_dir/model` (when enabled) on the reward model's labels (`labels`: the reward
    section's offline share and every round's comparisons), else on preferences.jsonl; metrics into `out_dir`."""
    tracker.log_params({"dpo": asdict(config), "precision": precision})
    with staged_dir(out_dir) as tmp:
        metrics: dict[str, Any] = {"enabled": config.enabled}
        if config.enabled:
            seed_everything(config.seed)
            rows = (
                training_pairs(labels[0], data_dir, labels[1]) if labels else read_jsonl(data_dir / "preferences.jsonl")
            )
            model, tokenizer, history, seconds, truncated = train(config, sft_dir, rows, tracker, precision)
            keep_context(tokenizer, context_limit(model, config.max_length))
            model.save_pretrained(tmp / "model", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "model")
            losses = [h["loss"] for h in history if "loss" in h]
            metrics |= {
                "train_seconds": round(seconds, 2),
                "n_train": len(rows),
                "precision": precision,
                "train_loss": round(losses[-1], 5) if losses else None,
                **truncated,
            }
        else:  # DVC tracks model/ as the stage's output: say why it holds no policy
            (tmp / "model").mkdir()
            (tmp / "model/DISABLED.txt").write_text("dpo.enabled is false in params.yaml: no DPO policy was trained.\n")
        write_json(tmp / "metrics.json", metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    if config.enabled:
        tracker.log_artifact(out_dir / "model", "model")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.dpo", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data", help="validated datasets")
    parser.add_argument("--sft", default="artifacts/sft/model", help="the SFT model: the start and the reference")
    parser.add_argument(
        "--comparisons", action="append", default=[], help="a comparisons stage's output: the same labels as the RM"
    )
    parser.add_argument("--out", default="artifacts/dpo")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(DPOConfig, params.get("dpo"))
    precision = use_hardware(params).precision
    with mlflow_run("dpo", tags={"rlhf.precision": precision}) as tracker:
        labels = (config_from(RewardConfig, params.get("reward")), [Path(c) for c in args.comparisons])
        metrics = run(config, Path(args.data), Path(args.sft), Path(args.out), tracker, precision, labels)
    print(
        f"DPO: {'trained in ' + str(metrics['train_seconds']) + ' s' if config.enabled else 'disabled'}; "
        f"saved to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("dpo", main))

"""SFT stage: supervised fine-tuning on demonstrations, loss on response tokens only (TRL's SFTTrainer).

Inputs: the validated `sft` and `sft_test` demonstrations. Output: `artifacts/sft/model`, an HF causal LM that PPO
starts from and keeps frozen as its reference, plus held-out loss and perplexity, sample generations and, on the
default task, the gold judge's mean score before and after training.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.lib import gold
from stages.lib.context import fit_pairs, reply_prefix
from stages.lib.io import read_jsonl, staged_dir, write_json, write_jsonl
from stages.lib.modeling import (
    LoraSettings,
    TinyModelConfig,
    context_limit,
    count_parameters,
    create_base_model,
    current_device,
    generate,
    keep_context,
    load_causal_lm,
    peft_config,
    seed_everything,
    trainer_device,
    trainer_precision,
    use_hardware,
)
from stages.lib.outcome import ArgumentParser, stage_main
from stages.lib.params import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, config_from, load_params
from stages.lib.plots import line_plot
from stages.lib.tracking import Tracker, mlflow_run, trainer_callback


@dataclass(frozen=True)
class SFTConfig:
    """params.yaml: sft."""

    model: str  # tiny-gpt2 | tiny-llama (built from `tiny`) | an HF folder or hub name
    trust_remote_code: bool
    tiny: TinyModelConfig
    max_length: int  # tokens of prompt + response; longer examples are truncated
    epochs: float
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    gradient_checkpointing: bool
    group_by_length: bool  # batches of similar length (HF's LengthGroupedSampler): far less padding
    lora: LoraSettings  # merged into the saved model
    seed: int
    logging_steps: int
    n_samples: int  # held-out prompts sampled for the saved generations and the gold score
    max_new_tokens: int
    temperature: float

    SECTION: ClassVar[str] = "sft"
    RANGES: ClassVar[dict] = {
        "max_length": AT_LEAST_ONE,
        "epochs": POSITIVE,
        "batch_size": AT_LEAST_ONE,
        "learning_rate": POSITIVE,
        "warmup_ratio": FRACTION,
        "weight_decay": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
        "logging_steps": AT_LEAST_ONE,
        "n_samples": AT_LEAST_ONE,
        "max_new_tokens": AT_LEAST_ONE,
        "temperature": NON_NEGATIVE,  # 0: greedy
    }


def train(
    config: SFTConfig,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict],
    test_rows: list[dict],
    tracker: Tracker,
    precision: str,
) -> tuple[Any, float, list[dict], float, dict[str, int]]:
    """Fine-tune on prompt/completion pairs with TRL's SFTTrainer, which masks the prompt tokens out of the loss.
    Returns (model, held-out loss, the trainer's log history, training seconds, rows cut to the context)."""
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    max_length = context_limit(model, config.max_length)
    sep = reply_prefix(tokenizer)

    def as_dataset(rows: list[dict[str, str]], split: str) -> Dataset:
        # the context budget: the reply keeps its start, the prompt its last turns (TRL appends the EOS)
        fitted = fit_pairs(tokenizer, [r["prompt"] for r in rows], [[r["response"] for r in rows]], max_length)
        truncated.update(fitted.counts(f"{split}_"))
        return Dataset.from_list(
            [{"prompt": p, "completion": sep + c} for p, c in zip(fitted.prompts, fitted.replies[0], strict=True)]
        )

    truncated: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch:
        args = TrlSFTConfig(
            output_dir=scratch,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup_ratio,
            weight_decay=config.weight_decay,
            max_length=max_length,
            completion_only_loss=True,
            gradient_checkpointing=config.gradient_checkpointing,
            logging_steps=config.logging_steps,
            eval_strategy="epoch" if config.epochs > 1 else "no",  # the last pass is read, not repeated (below)
            save_strategy="no",
            report_to="none",
            seed=config.seed,
            data_seed=config.seed,
            train_sampling_strategy="group_by_length" if config.group_by_length else "random",
            **trainer_device(current_device().type),
            dataloader_num_workers=0,
            disable_tqdm=False,
            **trainer_precision(precision),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=as_dataset(train_rows, "train"),
            eval_dataset=as_dataset(test_rows, "test"),
            processing_class=tokenizer,
            peft_config=peft_config(config.lora, "CAUSAL_LM", model),
            callbacks=[trainer_callback(tracker, "sft/")],
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        # held-out loss of the final model: the last epoch's evaluation when it ran at the last step (a whole number
        # of epochs), else one pass now (for a 135M model on 2 cores a pass over ~160 held-out rows is ~2 min)
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        done = evals and evals[-1]["step"] == trainer.state.global_step
        eval_loss = evals[-1]["eval_loss"] if done else trainer.evaluate()["eval_loss"]
    model = trainer.model.merge_and_unload() if config.lora.enabled else trainer.model
    return model, eval_loss, trainer.state.log_history, seconds, truncated


def run(config: SFTConfig, data_dir: Path, out_dir: Path, tracker: Tracker, precision: str = "fp32") -> dict[str, Any]:
    """Train, evaluate and save the SFT model into `out_dir` in `precision` (resolved); returns the metrics."""
    seed_everything(config.seed)
    train_rows, test_rows = read_jsonl(data_dir / "sft.jsonl"), read_jsonl(data_dir / "sft_test.jsonl")
    tracker.log_params(
        {"sft": asdict(config), "n_train": len(train_rows), "n_test": len(test_rows), "precision": precision}
    )
    sample_prompts = [r["prompt"] for r in test_rows[: config.n_samples]]

    with staged_dir(out_dir) as tmp:
        # 0. the starting model (a tiny one gets a tokenizer trained on all the task's text)
        texts = [r["prompt"] + " " + r["response"] for r in train_rows]
        for extra in ("preferences.jsonl", "prompts.jsonl"):
            if (data_dir / extra).exists():
                texts += [" ".join(r.values()) for r in read_jsonl(data_dir / extra)]
        base_dir = create_base_model(
            config.model, config.tiny, texts, tmp / "base", config.seed, config.trust_remote_code
        )
        model, tokenizer = load_causal_lm(base_dir, config.trust_remote_code)
        before = generate(model, tokenizer, sample_prompts, config.max_new_tokens, config.temperature, seed=config.seed)

        # 1. fine-tune
        model, eval_loss, history, train_seconds, truncated = train(
            config, model, tokenizer, train_rows, test_rows, tracker, precision
        )

        # 2. save the policy's starting point / PPO's frozen reference
        tokenizer.padding_side = "left"
        keep_context(tokenizer, context_limit(model, config.max_length))  # every later stage's window
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")

        # 3. samples and scores
        after = generate(model, tokenizer, sample_prompts, config.max_new_tokens, config.temperature, seed=config.seed)
        write_jsonl(
            tmp / "samples.jsonl",
            [
                {"prompt": p, "before": b, "after": a}
                for p, b, a in zip(sample_prompts, before.replies, after.replies, strict=True)
            ],
        )
        losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        line_plot(
            {"train": tuple(zip(*losses, strict=False)), "held-out": tuple(zip(*evals, strict=False))},
            "SFT loss (response tokens)",
            "step",
            "loss",
            tmp / "loss.png",
        )
        write_json(
            tmp / "loss.json", [{"step": s, "train_loss": v} for s, v in losses]
        )  # DVC plots read JSON, not JSON lines
        metrics = {
            "eval_loss": round(eval_loss, 5),
            "perplexity": round(math.exp(eval_loss), 4),
            "train_loss": round(losses[-1][1], 5) if losses else None,
            "train_seconds": round(train_seconds, 2),
            "n_parameters": count_parameters(model),
            "precision": precision,
            "eos_rate": sum(after.ended) / max(1, len(after.ended)),
            "gold_before": gold.gold_mean(sample_prompts, before.replies),
            "gold_after": gold.gold_mean(sample_prompts, after.replies),
            **truncated,
            "truncated_sample_prompts": after.truncated,
        }
        metrics = {k: v for k, v in metrics.items() if v is not None}
        write_json(tmp / "metrics.json", metrics)
        shutil.rmtree(tmp / "base")

    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    tracker.set_tags({"rlhf.precision": precision})
    for name in ("metrics.json", "samples.jsonl", "loss.png", "model"):
        tracker.log_artifact(out_dir / name, None if name != "model" else "model")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data", help="validated datasets")
    parser.add_argument("--out", default="artifacts/sft")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(SFTConfig, params.get("sft"))
    precision = use_hardware(params).precision
    with mlflow_run("sft") as tracker:
        metrics = run(config, Path(args.data), Path(args.out), tracker, precision)
    print(
        f"SFT: held-out perplexity {metrics['perplexity']:.3f}; gold {metrics.get('gold_before', 'n/a')} -> "
        f"{metrics.get('gold_after', 'n/a')}; saved to {args.out}/model"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("sft", main))

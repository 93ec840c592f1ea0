"""How each stage's cost grows with model size and data size (issue 17): wall time per step or per 1k rows, tokens/s and
peak RSS, measured one stage at a time in a process of its own (peak RSS from wait4), fp32, torch's 2 threads.

    .venv/bin/python benchmarks/scaling.py                        # every size and data multiple (~30 min on 2 cores)
    .venv/bin/python benchmarks/scaling.py --sizes 4x256 8x512 --steps 4

Model sizes are GPT-2 blocks built from config (no download): the default task's 4 x 256 up to GPT-2 small's 12 x 768
(~85M non-embedding parameters), vocabulary 512 (the default task's tokenizer). Per size: SFT and reward-model steps
with TRL's trainers (batch 32 of the default task's rows), PPO steps with this project's stage (batch 32, 48 response
tokens, 4 epochs x 2 minibatches; the four models: policy, reference, reward model, critic) and the evaluation's
per-policy measurement (sampling + RM + log-probs + KL) on 128 prompts. Per data multiple (1x, 4x, 16x the default
task's rows, at the default size): validation (Great Expectations) and one SFT epoch. Fits time ~ params^a and
time ~ rows^b by least squares on logs, and extrapolates PPO's peak RSS to where it would reach 24 GB.
Writes benchmarks/scaling_results.json and benchmarks/scaling.png. TRL 1.9's PPOTrainer at the same sizes is
measured by `benchmarks/run.sh --shapes A B S` (benchmarks/ppo_vs_trl.py), beside ours in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from stages.lib.environment import cpu_model
from stages.lib.params import defaults

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"4x256": (4, 256, 4), "6x384": (6, 384, 6), "8x512": (8, 512, 8), "12x768": (12, 768, 12)}
MULTIPLES = (1, 4, 16)


def child(code: str, args: dict) -> dict:
    """Run `code` (a worker below) in a fresh interpreter; its printed JSON plus its own peak RSS in MB."""
    cmd = [sys.executable, __file__, "--worker", code, "--args", json.dumps(args)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"worker {code} {args} failed:\n{text[-4000:]}")
    result = json.loads(text.strip().splitlines()[-1])
    return {**result, "peak_rss_mb": round(usage.ru_maxrss / 1024)}


# ------------------------------------------------------------------------------------------------------------ workers


def _data(multiple: int = 1) -> Path:
    """The default task at `multiple` times its rows, rendered as the validation stage writes it."""

    from stages.lib import task
    from stages.lib.formats import load_dataset
    from stages.lib.io import write_jsonl

    out = Path(tempfile.gettempdir()) / f"rlhf-scaling-data-{multiple}x"
    if (out / "done").exists():
        return out
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["task"]
    params = {**params, **{k: params[k] * multiple for k in ("n_sft", "n_pairs", "n_prompts")}}
    task.run(task.TaskConfig(**params), out / "raw")
    for name, kind in (
        ("sft", "sft"),
        ("sft_test", "sft"),
        ("preferences", "preferences"),
        ("preferences_test", "preferences"),
        ("prompts", "prompts"),
        ("eval_prompts", "prompts"),
    ):
        rows = load_dataset(out / "raw" / f"{name}.jsonl", kind).rows
        write_jsonl(out / f"{name}.jsonl", rows.drop(columns="source_row").to_dict("records"))
    (out / "done").write_text("")
    return out


def _model_dir(size: str) -> Path:
    from stages.lib.io import read_jsonl
    from stages.lib.modeling import TinyModelConfig, create_base_model

    out = Path(tempfile.gettempdir()) / f"rlhf-scaling-model-{size}"
    if not (out / "model.safetensors").exists():
        n_layer, n_embd, n_head = SIZES[size]
        data = _data()
        texts = [r["prompt"] + " " + r["response"] for r in read_jsonl(data / "sft.jsonl")]
        shape = defaults(TinyModelConfig, n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=512, dropout=0.0)
        create_base_model("tiny-gpt2", shape, texts, out, 0)
    return out


def _trainer_steps(kind: str, size: str, steps: int, multiple: int = 1, epoch: bool = False) -> dict:
    """`steps` SFT or RM steps (or one whole epoch) with the stage's own training code; time per step after the
    first."""
    from stages import sft
    from stages.lib import reward_training
    from stages.lib.io import read_jsonl
    from stages.lib.modeling import load_causal_lm
    from stages.lib.tracking import NullTracker

    data, model_dir = _data(multiple), _model_dir(size)
    times: list[float] = []
    tokens: list[int] = []

    class Clock(NullTracker):
        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            counted = [v for k, v in metrics.items() if k.endswith("/num_tokens")]  # a training step's log (cumulative)
            if counted and not any("eval" in k for k in metrics):
                times.append(time.perf_counter())
                tokens.append(int(counted[0]))

    if kind == "sft":
        rows = read_jsonl(data / "sft.jsonl")
        rows = rows if epoch else rows[: 32 * steps]
        config = defaults(sft.SFTConfig, epochs=1, logging_steps=1)
        model, tokenizer = load_causal_lm(model_dir)
        sft.train(config, model, tokenizer, rows, read_jsonl(data / "sft_test.jsonl")[:32], Clock(), "fp32")
    else:
        rows = read_jsonl(data / "preferences.jsonl")
        rows = rows if epoch else rows[: 32 * steps]
        config = defaults(reward_training.RewardConfig, epochs=1, logging_steps=1)
        reward_training.train(
            config, model_dir, rows, read_jsonl(data / "preferences_test.jsonl")[:32], Clock(), "fp32"
        )
    per_step = [b - a for a, b in zip(times, times[1:], strict=False)]
    step = sorted(per_step)[len(per_step) // 2] if per_step else float("nan")
    tok = (tokens[-1] - tokens[0]) / (times[-1] - times[0]) if len(times) > 1 and tokens[-1] else float("nan")
    return {
        "seconds_per_step": step,
        "tokens_per_second": tok,
        "steps": len(times),
        "rows": len(rows),
        "seconds_total": times[-1] - times[0] if len(times) > 1 else float("nan"),
    }


def _ppo_steps(size: str, steps: int) -> dict:
    """`steps` PPO steps of this project's stage on the size's model (policy = reference = RM = critic init)."""
    from stages.lib.tracking import NullTracker
    from stages.ppo import PPOConfig, run

    data, model_dir = _data(), _model_dir(size)
    with tempfile.TemporaryDirectory(prefix="rlhf-scaling-ppo-") as tmp:  # the RM copy: tens of MB to GB
        work = Path(tmp)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)  # scalar head, as the RM's
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rm.config.pad_token_id = tokenizer.pad_token_id
        rm.save_pretrained(work / "reward" / "model")
        tokenizer.save_pretrained(work / "reward" / "model")
        (work / "reward" / "norm.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
        times: list[tuple[float, float]] = []

        class Clock(NullTracker):
            def log_metrics(self, metrics: dict, step: int | None = None) -> None:
                if "time/step" in metrics:
                    times.append((time.perf_counter(), metrics["tokens/response_len_mean"] * 32))

        config = defaults(
            PPOConfig,
            num_steps=steps,
            batch_size=32,
            response_length=48,
            checkpoint_every=10**6,
            keep_checkpoints=1,
            checkpoint_dir=str(work / "ckpt"),
            resume="never",
            n_monitor=0,
            keep="last",
            kl_guard={"max_kl": 1e9, "max_approxkl": 1e9},
        )
        run(config, data, model_dir, work / "reward" / "model", work / "reward" / "norm.json", work / "out", Clock())
    per_step = [b - a for (a, _), (b, _) in zip(times, times[1:], strict=False)]
    step = sorted(per_step)[len(per_step) // 2]
    return {"seconds_per_step": step, "tokens_per_second": sum(t for _, t in times[1:]) / sum(per_step)}


def _evaluate(size: str) -> dict:
    """The evaluation's measurement of one policy on 128 held-out prompts (sampling, RM score, log-probs, KL)."""
    from stages.lib.heldout import Sampling, evaluate_policy
    from stages.lib.io import read_jsonl
    from stages.lib.judge import GoldJudge
    from stages.lib.modeling import load_causal_lm
    from stages.lib.rewards import RewardModel

    data, model_dir = _data(), _model_dir(size)
    policy, tokenizer = load_causal_lm(model_dir)
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval(),
        tokenizer,
        {"mean": 0.0, "std": 1.0},
    )  # a scalar head on the size's backbone: its cost is the point
    rm.model.config.pad_token_id = tokenizer.pad_token_id
    prompts = [r["prompt"] for r in read_jsonl(data / "eval_prompts.jsonl")][:128]
    start = time.perf_counter()
    evaluate_policy("p", policy, tokenizer, rm, GoldJudge(), policy, prompts, Sampling())
    return {"seconds_per_1k_prompts": (time.perf_counter() - start) * 1000 / len(prompts)}


def _validate(multiple: int) -> dict:
    """The validation stage on the default task at `multiple` times its rows (all six datasets)."""
    from stages import validate

    raw = _data(multiple) / "raw"
    specs = {
        name: validate.DatasetSpec(str(raw / f"{name}.jsonl"), kind)
        for name, kind in (
            ("sft", "sft"),
            ("sft_test", "sft"),
            ("preferences", "preferences"),
            ("preferences_test", "preferences"),
            ("prompts", "prompts"),
            ("eval_prompts", "prompts"),
        )
    }
    rows = sum(len(Path(s.path).read_bytes().splitlines()) for s in specs.values())
    with tempfile.TemporaryDirectory(prefix="rlhf-scaling-validate-") as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        config = defaults(validate.ValidateConfig)  # as make run
        validate.run(config, specs, out / "data", out / "reports", out / "metrics.json")
        seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "seconds_per_1k_rows": seconds * 1000 / rows}


WORKERS = {
    "sft": lambda a: _trainer_steps("sft", a["size"], a["steps"], a.get("multiple", 1), a.get("epoch", False)),
    "reward": lambda a: _trainer_steps("reward", a["size"], a["steps"]),
    "ppo": lambda a: _ppo_steps(a["size"], a["steps"]),
    "evaluate": lambda a: _evaluate(a["size"]),
    "validate": lambda a: _validate(a["multiple"]),
}


# -------------------------------------------------------------------------------------------------------------- driver


def n_params(size: str) -> int:
    """Non-embedding parameters of a GPT-2 block stack: 12 d^2 per layer (attention 4 d^2, MLP 8 d^2)."""
    n_layer, d, _ = SIZES[size]
    return 12 * n_layer * d * d


def fit(xs: list[float], ys: list[float]) -> float:
    """The exponent a of y ~ x^a, least squares on logs."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--steps", type=int, default=5, help="training steps per measurement (the first is warm-up)")
    parser.add_argument("--multiples", type=int, nargs="+", default=list(MULTIPLES))
    parser.add_argument(
        "--sizes-from",
        metavar="JSON",
        help="take the model sizes' rows from an earlier results file (measure only the data multiples)",
    )
    parser.add_argument("--worker"), parser.add_argument("--args")
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(WORKERS[args.worker](json.loads(args.args))))
        return
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "load_before": Path("/proc/loadavg").read_text().split()[:3],
        "sizes": {},
        "data": {},
    }
    if args.sizes_from:
        earlier = json.loads(Path(args.sizes_from).read_text())
        results |= {"sizes": earlier["sizes"], "sizes_measured": earlier["date"]}
    for size in [] if args.sizes_from else args.sizes:
        row = {"non_embedding_params": n_params(size)}
        for stage in ("sft", "reward", "ppo", "evaluate"):
            row[stage] = child(stage, {"size": size, "steps": args.steps})
            print(size, stage, row[stage], flush=True)
        results["sizes"][size] = row
    for m in args.multiples:
        results["data"][f"{m}x"] = {
            "validate": child("validate", {"multiple": m}),
            "sft_epoch": child("sft", {"size": "4x256", "steps": 0, "multiple": m, "epoch": True}),
        }
        print(f"{m}x", results["data"][f"{m}x"], flush=True)
    summarise(results)
    (ROOT / "benchmarks/scaling_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["fits"], indent=2))


def summarise(results: dict) -> None:
    """Fitted exponents, where PPO's memory would reach 24 GB, and the plot."""
    sizes = list(results["sizes"])
    params = [results["sizes"][s]["non_embedding_params"] for s in sizes]
    fits: dict = {}
    for stage, key in (
        ("sft", "seconds_per_step"),
        ("reward", "seconds_per_step"),
        ("ppo", "seconds_per_step"),
        ("evaluate", "seconds_per_1k_prompts"),
    ):
        if len(sizes) > 1:
            fits[f"{stage}: time ~ params^a"] = round(fit(params, [results["sizes"][s][stage][key] for s in sizes]), 3)
    multiples = [int(m.rstrip("x")) for m in results["data"]]
    if len(multiples) > 1:
        for stage, key in (("validate", "seconds"), ("sft_epoch", "seconds_total")):
            ys = [results["data"][f"{m}x"][stage][key] for m in multiples]
            fits[f"{stage}: time ~ rows^b"] = round(fit(multiples, ys), 3)
    if len(sizes) > 1:  # peak RSS is roughly affine in the parameters: extrapolate the line to 24 GB
        rss = [results["sizes"][s]["ppo"]["peak_rss_mb"] for s in sizes]
        slope = (rss[-1] - rss[0]) / (params[-1] - params[0])
        fits["ppo: peak RSS MB per 1M non-embedding params"] = round(slope * 1e6, 2)
        fits["ppo: non-embedding params at 24 GB (extrapolated)"] = int(params[0] + (24 * 1024 - rss[0]) / slope)
    results["fits"] = fits
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in ("sft", "reward", "ppo"):
        ax.plot(params, [results["sizes"][s][stage]["seconds_per_step"] for s in sizes], marker="o", label=stage)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="non-embedding parameters",
        ylabel="seconds per step (batch 32)",
        title=f"Stage cost vs model size ({results['cpu']}, 2 threads)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "benchmarks/scaling.png", dpi=100)


if __name__ == "__main__":
    main()

"""Evaluation stage: the PPO policy against the SFT baseline on held-out prompts, with the same sampling settings.

The reward model is a proxy. So besides its score we report the gold judge (default task), the KL to the reference,
the alignment tax (held-out SFT perplexity) and an over-optimisation monitor: RM and gold score over the PPO
checkpoints; the proxy rising while gold falls is flagged (Gao et al. 2022, "Scaling laws for RM overoptimization").
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stages import ppo_math as pm
from stages import task
from stages.io import read_jsonl, staged_dir, write_json, write_jsonl
from stages.modeling import autocast, context_limit, generate, resolve_precision
from stages.params import config_from, load_params, stage_main
from stages.plots import line_plot
from stages.tracking import Tracker, mlflow_run


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml: evaluate."""

    n_prompts: int = 128
    max_new_tokens: int = 48
    temperature: float = 0.7  # the PPO sampling temperature: compare policies as they are used
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1
    n_report_samples: int = 24
    overopt_rm_rise: float = 0.1  # flag when the normalised RM score rose by more than this ...
    overopt_gold_drop: float = 0.1  # ... while the gold score fell by more than this, from its best checkpoint


def win_rate(a: list[float], b: list[float]) -> float:
    """Per-prompt pairwise win-rate of a over b; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of the replies (Li et al. 2016)."""
    grams = [tuple(t.split()[i : i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: list[str], replies: list[str], temperature: float) -> tuple:
    """Per-token log-probs of `" " + reply + EOS` after each prompt. Returns (logprobs (B, T), mask (B, T))."""
    model.eval()
    enc_p = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    enc_r = [tokenizer(" " + r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in replies]
    limit = context_limit(model, 10**9)
    rows = [(p + r)[:limit] for p, r in zip(enc_p, enc_r, strict=True)]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    target_mask = torch.zeros(len(rows), L)
    for i, (row, p) in enumerate(zip(rows, enc_p, strict=True)):
        ids[i, : len(row)], attn[i, : len(row)] = torch.tensor(row), 1
        target_mask[i, len(p) : len(row)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    logprobs = pm.logprobs_from_logits(logits, ids[:, 1:], temperature)
    return logprobs, target_mask[:, 1:]


@torch.no_grad()
def perplexity(model, tokenizer, rows: list[dict[str, str]]) -> float:
    """exp(mean NLL of response tokens) on held-out demonstrations: the alignment tax is its rise after PPO."""
    logprobs, mask = sequence_logprobs(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], 1.0)
    return math.exp(-pm.masked_mean(logprobs, mask).item())


def overoptimisation(monitor: list[dict[str, float]], rm_rise: float, gold_drop: float) -> tuple[bool, str]:
    """Flag the proxy rising while gold falls, measured from the checkpoint where gold was best to the last."""
    rows = [m for m in monitor if m.get("gold") is not None]
    if len(rows) < 2:
        return False, "not enough checkpoints with a gold score to judge over-optimisation"
    best = max(rows, key=lambda m: m["gold"])
    last = rows[-1]
    d_rm, d_gold = last["rm_score"] - best["rm_score"], last["gold"] - best["gold"]
    flagged = d_rm > rm_rise and -d_gold > gold_drop
    verdict = "over-optimisation: " if flagged else "no over-optimisation: "
    return flagged, (f"{verdict}from step {best['step']:.0f} to {last['step']:.0f} the RM score moved {d_rm:+.3f} "
                     f"and the gold score {d_gold:+.3f}")  # fmt: skip


def evaluate_policy(name: str, model, tokenizer, rm, rm_tok, norm, ref, prompts, config: EvaluateConfig) -> dict:
    """Sample one reply per prompt and measure it: RM score, gold, KL to the reference, length, diversity, EOS."""
    from stages.reward import score

    replies, ended = generate(model, tokenizer, prompts, config.max_new_tokens, config.temperature, config.top_k,
                              config.top_p, seed=config.seed)  # fmt: skip
    rm_scores = [(s - norm["mean"]) / norm["std"] for s in score(rm, rm_tok, prompts, replies, context_limit(rm, 512))]
    logprobs, mask = sequence_logprobs(model, tokenizer, prompts, replies, config.temperature)
    ref_logprobs, _ = sequence_logprobs(ref, tokenizer, prompts, replies, config.temperature)
    k1, k3 = pm.kl_k1(logprobs, ref_logprobs) * mask, pm.kl_k3(logprobs, ref_logprobs) * mask
    gold = [task.gold_score(p, r) for p, r in zip(prompts, replies, strict=True)] if task.judge_applies(prompts) else None
    out = {
        "replies": replies, "rm_scores": rm_scores, "gold_scores": gold,
        f"{name}/rm_score": sum(rm_scores) / len(rm_scores),
        f"{name}/kl_k1_seq": k1.sum(1).mean().item(), f"{name}/kl_k3_seq": k3.sum(1).mean().item(),
        f"{name}/kl_k1_token": pm.masked_mean(k1, mask).item(), f"{name}/kl_k3_token": pm.masked_mean(k3, mask).item(),
        f"{name}/response_words": sum(len(r.split()) for r in replies) / len(replies),
        f"{name}/distinct_1": distinct_n(replies, 1), f"{name}/distinct_2": distinct_n(replies, 2),
        f"{name}/eos_rate": sum(ended) / len(ended),
    }  # fmt: skip
    if gold is not None:
        out[f"{name}/gold"] = sum(gold) / len(gold)
    return out


def run(config: EvaluateConfig, data_dir: Path, sft_dir: Path, rm_dir: Path, ppo_dir: Path, out_dir: Path,
        tracker: Tracker) -> dict[str, Any]:  # fmt: skip
    """Compare PPO with SFT; write metrics.json, report.md/.html, samples and plots into `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tracker.log_params({"evaluate": asdict(config)})
    prompts = [r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")][: config.n_prompts]
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    rm_tok = AutoTokenizer.from_pretrained(sft_dir, padding_side="right")
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir / "model", use_safetensors=True).eval()
    norm = json.loads((rm_dir / "norm.json").read_text())
    sft = AutoModelForCausalLM.from_pretrained(sft_dir, use_safetensors=True).eval()
    policy = AutoModelForCausalLM.from_pretrained(ppo_dir / "model", use_safetensors=True).eval()

    # 1. both policies on the same prompts, same sampling settings, same seed
    res = {n: evaluate_policy(n, m, tokenizer, rm, rm_tok, norm, sft, prompts, config) for n, m in
           (("sft", sft), ("ppo", policy))}  # fmt: skip
    metrics: dict[str, Any] = {k: v for r in res.values() for k, v in r.items() if "/" in k}
    judge = "gold" if res["ppo"]["gold_scores"] is not None else "rm"
    metrics["judge"] = judge
    metrics["win_rate_vs_sft"] = win_rate(res["ppo"][f"{judge}_scores"], res["sft"][f"{judge}_scores"])
    metrics["rm_win_rate_vs_sft"] = win_rate(res["ppo"]["rm_scores"], res["sft"]["rm_scores"])

    # 2. the alignment tax: held-out SFT perplexity before and after PPO
    heldout = read_jsonl(data_dir / "sft_test.jsonl")
    metrics["sft/perplexity"], metrics["ppo/perplexity"] = perplexity(sft, tokenizer, heldout), perplexity(policy, tokenizer, heldout)
    metrics["alignment_tax"] = metrics["ppo/perplexity"] - metrics["sft/perplexity"]

    # 3. over-optimisation over the PPO checkpoints (written by the PPO stage)
    monitor_file = ppo_dir / "monitor.csv"
    monitor = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
               for row in csv.DictReader(monitor_file.open())] if monitor_file.exists() else []  # fmt: skip
    metrics["overoptimisation"], metrics["overoptimisation_reason"] = overoptimisation(
        monitor, config.overopt_rm_rise, config.overopt_gold_drop)

    with staged_dir(out_dir) as tmp:
        samples = [{"prompt": p, "sft": s, "ppo": q, "sft_rm": a, "ppo_rm": b,
                    "sft_gold": (res["sft"]["gold_scores"] or [None] * len(prompts))[i],
                    "ppo_gold": (res["ppo"]["gold_scores"] or [None] * len(prompts))[i]}
                   for i, (p, s, q, a, b) in enumerate(zip(prompts, res["sft"]["replies"], res["ppo"]["replies"],
                                                           res["sft"]["rm_scores"], res["ppo"]["rm_scores"], strict=True))]  # fmt: skip
        write_jsonl(tmp / "samples.jsonl", samples)
        plots = write_plots(tmp, ppo_dir, monitor)
        write_report(tmp, metrics, samples[: config.n_report_samples], plots)
        write_json(tmp / "metrics.json", metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float | bool)})
    tracker.set_tags({"rlhf.overoptimisation": str(metrics["overoptimisation"])})
    for name in ("metrics.json", "report.md", "report.html", "samples.jsonl", *plots):
        tracker.log_artifact(out_dir / name)
    return metrics


def write_plots(out: Path, ppo_dir: Path, monitor: list[dict]) -> list[str]:
    """Reward vs KL over PPO steps, and gold vs proxy over the checkpoints."""
    names = []
    kl_file = ppo_dir / "kl.csv"
    if kl_file.exists():
        rows = list(csv.DictReader(kl_file.open()))
        if rows:
            line_plot({"RM score (normalised)": ([float(r["objective/kl"]) for r in rows],
                                                 [float(r["objective/scores"]) for r in rows])},
                      "PPO: reward vs KL to the reference", "KL (nats per response)", "score", out / "reward_vs_kl.png")  # fmt: skip
            names.append("reward_vs_kl.png")
    if monitor:
        steps = [m["step"] for m in monitor]
        series = {"RM score (proxy)": (steps, [m["rm_score"] for m in monitor])}
        if all(m.get("gold") is not None for m in monitor):
            series["gold score"] = (steps, [m["gold"] for m in monitor])
        line_plot(series, "Gold vs proxy over PPO checkpoints (held-out)", "PPO step", "mean score",
                  out / "gold_vs_proxy.png")  # fmt: skip
        names.append("gold_vs_proxy.png")
    return names


def write_report(out: Path, metrics: dict[str, Any], samples: list[dict], plots: list[str]) -> None:
    """report.md and report.html: headline numbers, plots and a side-by-side sample table."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    keys = ["rm_score", "gold", "kl_k1_seq", "kl_k3_seq", "kl_k1_token", "kl_k3_token", "response_words",
            "distinct_1", "distinct_2", "eos_rate", "perplexity"]  # fmt: skip
    rows = [(k, metrics.get(f"sft/{k}"), metrics.get(f"ppo/{k}")) for k in keys if f"ppo/{k}" in metrics]
    md = ["# Evaluation: PPO vs SFT on held-out prompts", "",
          f"- {metrics['judge']} win-rate of PPO over SFT (ties half): **{metrics['win_rate_vs_sft']:.3f}**",
          f"- RM win-rate of PPO over SFT: {metrics['rm_win_rate_vs_sft']:.3f}",
          f"- alignment tax (held-out SFT perplexity, PPO - SFT): {metrics['alignment_tax']:+.4f}",
          f"- {metrics['overoptimisation_reason']}", "", "| metric | SFT | PPO |", "|---|---|---|"]  # fmt: skip
    md += [f"| {k} | {fmt(a)} | {fmt(b)} |" for k, a, b in rows]
    md += ["", *[f"![{p}]({p})" for p in plots], "", "## Samples", "",
           "| prompt | SFT | PPO | RM (SFT / PPO) | gold (SFT / PPO) |", "|---|---|---|---|---|"]  # fmt: skip
    for s in samples:
        cells = [s["prompt"].replace("\n", " ").strip(), s["sft"], s["ppo"], f"{s['sft_rm']:.2f} / {s['ppo_rm']:.2f}",
                 f"{fmt(s['sft_gold'])} / {fmt(s['ppo_gold'])}"]  # fmt: skip
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    table = "".join(f"<tr><td>{html.escape(s['prompt'].strip())}</td><td>{html.escape(s['sft'])}</td>"
                    f"<td>{html.escape(s['ppo'])}</td><td>{s['sft_rm']:.2f} / {s['ppo_rm']:.2f}</td>"
                    f"<td>{fmt(s['sft_gold'])} / {fmt(s['ppo_gold'])}</td></tr>" for s in samples)  # fmt: skip
    summary = "".join(f"<tr><td>{k}</td><td>{fmt(a)}</td><td>{fmt(b)}</td></tr>" for k, a, b in rows)
    (out / "report.html").write_text(
        "<!doctype html><meta charset=utf-8><title>RLHF evaluation</title><style>body{font-family:sans-serif;"
        "max-width:1100px;margin:auto}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "table{border-collapse:collapse}</style><h1>PPO vs SFT on held-out prompts</h1>"
        f"<p>{metrics['judge']} win-rate of PPO over SFT: <b>{metrics['win_rate_vs_sft']:.3f}</b>; alignment tax "
        f"{metrics['alignment_tax']:+.4f}; {html.escape(metrics['overoptimisation_reason'])}</p>"
        f"<table><tr><th>metric</th><th>SFT</th><th>PPO</th></tr>{summary}</table>"
        + "".join(f'<p><img src="{p}"></p>' for p in plots)
        + "<h2>Samples</h2><table><tr><th>prompt</th><th>SFT</th><th>PPO</th><th>RM</th><th>gold</th></tr>"
        f"{table}</table>", encoding="utf-8")  # fmt: skip


def materialise_model_uri(uri: str, scratch: Path) -> Path:
    """A registered policy (pyfunc logged by the promote stage) saved as an HF folder under `scratch/model`."""
    import mlflow

    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    loaded.model.save_pretrained(scratch / "model", safe_serialization=True)
    loaded.tokenizer.save_pretrained(scratch / "model")
    return scratch


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data")
    parser.add_argument("--sft", default="artifacts/sft/model")
    parser.add_argument("--reward", default="artifacts/reward", help="the reward stage's folder (model, norm.json)")
    parser.add_argument("--ppo", default="artifacts/ppo")
    parser.add_argument("--out", default="artifacts/evaluate")
    parser.add_argument("--model-uri", help="evaluate this MLflow model (e.g. models:/rlhf-policy@champion) "
                        "instead of the PPO stage's output")  # fmt: skip
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(EvaluateConfig, params.get("evaluate"))
    precision = resolve_precision(params.get("precision", "auto"))
    import tempfile

    with mlflow_run("evaluate", tags={"rlhf.precision": precision}) as tracker, autocast(precision), \
            tempfile.TemporaryDirectory() as scratch:  # fmt: skip
        ppo_dir = Path(args.ppo)
        if args.model_uri:
            ppo_dir = materialise_model_uri(args.model_uri, Path(scratch))
            tracker.set_tags({"rlhf.model_uri": args.model_uri})
        m = run(config, Path(args.data), Path(args.sft), Path(args.reward), ppo_dir, Path(args.out), tracker)
    gold = f"; gold SFT {m['sft/gold']:.3f} -> PPO {m['ppo/gold']:.3f}" if "ppo/gold" in m else ""
    print(f"evaluation: {m['judge']} win-rate vs SFT {m['win_rate_vs_sft']:.3f}{gold}; KL {m['ppo/kl_k1_seq']:.3f}; "
          f"report {args.out}/report.md")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main(main))

"""Evaluation stage: the PPO policy against the SFT baseline on held-out prompts, with the same sampling settings.

The reward model is a proxy. So besides its score we report an independent judge's (stages/lib/judge.py: the gold
function on the default task, else a judge reward model or the user's scorer; never the reward model PPO climbed), the
KL to the reference, the alignment tax (the perplexity of the held-out demonstrations the judge rates best) and an
over-optimisation monitor: RM and judge score over the PPO checkpoints; the proxy rising while the judge's score
falls is flagged (Gao et al. 2022, "Scaling laws for reward model overoptimization").
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from stages.lib.heldout import (
    Sampling,
    best_of_n,
    best_of_n_kl,
    evaluate_policy,
    judged_best,
    paired_comparison,
    perplexity,
    win_rate,
)
from stages.lib.io import read_jsonl, staged_dir, write_json, write_jsonl
from stages.lib.judge import GoldJudge, Judge, load_judge
from stages.lib.modeling import autocast, load_causal_lm, use_hardware
from stages.lib.outcome import ArgumentParser, stage_main
from stages.lib.params import AT_LEAST_ONE, NON_NEGATIVE, Allowed, config_from, load_params, value
from stages.lib.plots import line_plot, scatter_plot
from stages.lib.registry import fetch_policy
from stages.lib.rewards import RewardEnsemble, RewardModel
from stages.lib.tracking import Tracker, mlflow_run


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml: evaluate."""

    n_prompts: int  # distinct held-out prompts evaluated, at most (each once, in the file's order)
    samples_per_prompt: int  # replies per prompt and policy: win-rates and differences are clustered by prompt
    max_new_tokens: int
    temperature: float  # the PPO sampling temperature: compare policies as they are used
    top_k: int
    top_p: float
    seed: int
    n_report_samples: int
    overopt_rm_rise: float  # flag when the normalised RM score rose by more than this ...
    overopt_judge_drop: float  # ... while the judge's score fell by more than this, from its best checkpoint, and by
    overopt_z: float  # more than this many standard errors of the paired per-prompt difference (not the noise)
    best_of_n_pool: int  # SFT replies per prompt for the best-of-n ladder: best-of-n picks from disjoint blocks of n
    best_of_n: list[int]  # best-of-n from SFT, picked by the RM: the baseline PPO
    #   must beat at the same KL (log n - (n-1)/n nats); [] skips it
    tax_share: float  # the alignment tax is measured on the held-out demonstrations the judge rates in its top
    #   share (1.0: every one); the tax on every one is reported beside it

    SECTION: ClassVar[str] = "evaluate"
    RANGES: ClassVar[dict] = {
        "n_prompts": AT_LEAST_ONE,
        "samples_per_prompt": AT_LEAST_ONE,
        "best_of_n_pool": AT_LEAST_ONE,
        "max_new_tokens": AT_LEAST_ONE,
        "temperature": NON_NEGATIVE,  # 0: greedy
        "top_k": NON_NEGATIVE,
        "top_p": Allowed(0, 1, low_open=True),
        "seed": NON_NEGATIVE,
        "n_report_samples": NON_NEGATIVE,
        "overopt_rm_rise": NON_NEGATIVE,
        "overopt_judge_drop": NON_NEGATIVE,
        "overopt_z": NON_NEGATIVE,
        "tax_share": Allowed(0, 1, low_open=True),
    }

    def __post_init__(self) -> None:
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.best_of_n):
            raise ValueError(f"evaluate.best_of_n = {self.best_of_n!r}: expected a list of whole numbers >= 1")


def overoptimisation(
    monitor: list[dict[str, float]], rm_rise: float, judge_drop: float, z: float = 0.0
) -> tuple[bool, str]:
    """Flag the proxy rising while the judge's score falls, from the checkpoint where the judge's score was best to
    the policy PPO kept (the row marked `kept`; the last one when none is): the RM score up by more than `rm_rise`, the
    judge's down by more than `judge_drop` and by more than `z` standard errors of the paired per-prompt difference
    (the monitor's `judge_minus_kept_se`, where it has one): a drop within the monitor's noise is not a finding. A run
    that over-optimised after its best checkpoint but kept that checkpoint is not flagged: the reason still says what
    the run did after it."""
    rows = [m for m in monitor if m.get("judge") is not None]
    if len(rows) < 2:
        return False, "not enough checkpoints with a judge's score to judge over-optimisation"
    best = max(rows, key=lambda m: m["judge"])
    kept = next((m for m in rows if m.get("kept")), rows[-1])
    d_rm, d_judge = kept["rm_score"] - best["rm_score"], kept["judge"] - best["judge"]
    se = best.get("judge_minus_kept_se") or 0.0
    flagged = d_rm > rm_rise and -d_judge > judge_drop and -d_judge > z * se
    verdict = "over-optimisation: " if flagged else "no over-optimisation: "
    reason = (
        f"{verdict}from step {best['step']:.0f} (best judge's score) to the kept step {kept['step']:.0f} the "
        f"RM score moved {d_rm:+.3f} and the judge's score {d_judge:+.3f}"
        if kept is not best
        else f"{verdict}the kept step {kept['step']:.0f} has the best judge's score of the {len(rows)} checkpoints"
    )
    if se and not flagged and d_rm > rm_rise and -d_judge > judge_drop:
        reason += f", within {z:g} standard errors ({se:.3f}) of the monitor's noise"
    last = rows[-1]
    if (
        kept is not last
        and last["rm_score"] - best["rm_score"] > rm_rise
        and best["judge"] - last["judge"] > judge_drop
    ):
        reason += (
            f"; the run over-optimised after it (to step {last['step']:.0f}: RM "
            f"{last['rm_score'] - best['rm_score']:+.3f}, judge {last['judge'] - best['judge']:+.3f}), which "
            "keeping the best checkpoint undid"
        )
    return flagged, reason


@dataclass(frozen=True)
class Inputs:
    """What the evaluation reads (dvc.yaml passes each path in the stage's command)."""

    data: Path  # the validated datasets: eval_prompts.jsonl, sft_test.jsonl
    sft: Path  # the SFT model: the baseline and the KL reference
    policy: Path  # the policy evaluated (the PPO stage's, or a registered model materialised)
    rm: Path  # the reward model ...
    norm: Path  # ... and its normalisation
    kl: Path | None = None  # PPO's per-step table (reward vs KL plot)
    judge: Path | None = None  # the judge stage's judge (None: the default task's gold function)
    dpo: Path | None = None  # the DPO stage's folder: its policy (model/) is evaluated beside PPO's when it trained
    monitor: Path | None = None  # PPO's held-out RM and judge score per checkpoint (over-optimisation)
    rounds: tuple[tuple[Path, Path], ...] = ()  # each round's gate verdict and PPO metrics (the report's rounds)
    ensemble_penalty: float = 0.0  # ppo.ensemble_penalty: a reward ensemble scores here as PPO's reward did


def eval_rows(data_dir: Path, config: EvaluateConfig) -> list[str]:
    """Every distinct held-out prompt (at most `n_prompts`, in the file's order), each `samples_per_prompt` times in a
    row: the rows every policy is sampled on, one reply a row."""
    distinct = list(dict.fromkeys(r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")))
    return [p for p in distinct[: config.n_prompts] for _ in range(config.samples_per_prompt)]


def compare(name: str, scores: list[float], base: list[float], rows: list[str], seed: int) -> dict[str, Any]:
    """`name`'s win-rate over SFT and paired judge difference, each with its prompt-clustered 95% interval."""
    c = paired_comparison(scores, base, rows, seed=seed)
    prefix = "" if name == "ppo" else f"{name}_"
    return {
        f"{prefix}win_rate_vs_sft": c["win_rate"],
        f"{prefix}win_rate_vs_sft_ci95": c["win_rate_ci95"],
        f"{prefix}win_rate_vs_sft_ci": [c["win_rate_ci_low"], c["win_rate_ci_high"]],
        f"{prefix}ties_vs_sft": c["ties"],
        f"{prefix}judge_diff_vs_sft": c["diff"],
        f"{prefix}judge_diff_vs_sft_ci": [c["diff_ci_low"], c["diff_ci_high"]],
    }


def run(config: EvaluateConfig, inputs: Inputs, out_dir: Path, tracker: Tracker) -> dict[str, Any]:
    """Compare the policy with SFT; write metrics.json, report.md/.html, samples and plots into `out_dir`."""
    data_dir = inputs.data
    tracker.log_params({"evaluate": asdict(config)})
    prompts = eval_rows(data_dir, config)
    sft, tokenizer = load_causal_lm(inputs.sft)
    policy, _ = load_causal_lm(inputs.policy)
    rm = RewardEnsemble.load_all(inputs.rm, inputs.norm, inputs.ensemble_penalty)  # best-of-n picks as PPO climbs
    judge = load_judge(inputs.judge) if inputs.judge else GoldJudge()
    tracker.set_tags({"rlhf.judge": judge.name})

    # 1. both policies on the same prompts, same sampling settings, same seed, graded by the same judge
    sampling = Sampling.of(asdict(config))
    models = {"sft": sft, "ppo": policy}
    res = {n: evaluate_policy(n, m, tokenizer, rm, judge, sft, prompts, sampling) for n, m in models.items()}
    metrics: dict[str, Any] = {k: v for r in res.values() for k, v in r.items() if "/" in k}
    metrics["judge"] = judge.name
    metrics["prompts"], metrics["samples_per_prompt"] = len(dict.fromkeys(prompts)), config.samples_per_prompt
    sft_scores = res["sft"]["judge_scores"]
    metrics |= compare("ppo", res["ppo"]["judge_scores"], sft_scores, prompts, config.seed)
    metrics["rm_win_rate_vs_sft"] = win_rate(res["ppo"]["rm_scores"], res["sft"]["rm_scores"])
    metrics |= best_of_n_baseline(sft, tokenizer, rm, judge, prompts, sampling, config, sft_scores)
    if inputs.dpo is not None and (inputs.dpo / "model/config.json").exists():  # the DPO baseline, graded the same way
        dpo, _ = load_causal_lm(inputs.dpo / "model")
        models["dpo"] = dpo
        res["dpo"] = evaluate_policy("dpo", dpo, tokenizer, rm, judge, sft, prompts, sampling)
        metrics |= {k: v for k, v in res["dpo"].items() if "/" in k}
        metrics |= compare("dpo", res["dpo"]["judge_scores"], sft_scores, prompts, config.seed)
    metrics |= matched_best_of_n(metrics)
    metrics["rounds"] = rounds_table(inputs.rounds)

    # 2. the alignment tax: the rise of held-out demonstrations' perplexity, on those the judge rates best (promotion's)
    #    and on every one (reported)
    heldout = read_jsonl(data_dir / "sft_test.jsonl")
    best = judged_best(heldout, judge, config.tax_share)
    metrics["tax_demonstrations"], metrics["demonstrations"] = len(best), len(heldout)
    for name, model in models.items():
        metrics[f"{name}/perplexity"] = perplexity(model, tokenizer, best)
        metrics[f"{name}/perplexity_all"] = perplexity(model, tokenizer, heldout)
    metrics["alignment_tax"] = metrics["ppo/perplexity"] - metrics["sft/perplexity"]
    metrics["alignment_tax_all"] = metrics["ppo/perplexity_all"] - metrics["sft/perplexity_all"]

    # 3. over-optimisation over the PPO checkpoints (written by the PPO stage)
    monitor = (
        [
            {k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in csv.DictReader(inputs.monitor.open())
        ]
        if inputs.monitor
        else []
    )
    metrics["overoptimisation"], metrics["overoptimisation_reason"] = overoptimisation(
        monitor, config.overopt_rm_rise, config.overopt_judge_drop, config.overopt_z
    )

    with staged_dir(out_dir) as tmp:
        samples = [
            {
                "prompt": p,
                **{
                    f"{n}{suffix}": r[key][i]
                    for n, r in res.items()
                    for suffix, key in (("", "replies"), ("_rm", "rm_scores"), ("_judge", "judge_scores"))
                },
            }
            for i, p in enumerate(prompts)
        ]
        write_jsonl(tmp / "samples.jsonl", samples)
        plots = write_plots(tmp, inputs.kl, monitor, metrics)
        shown = samples[:: config.samples_per_prompt][: config.n_report_samples]  # one row per prompt
        write_report(tmp, metrics, shown, plots, metrics["prompts"])
        write_json(tmp / "metrics.json", metrics)
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float | bool)})
    tracker.set_tags({"rlhf.overoptimisation": str(metrics["overoptimisation"])})
    for name in ("metrics.json", "report.md", "report.html", "samples.jsonl", *plots):
        tracker.log_artifact(out_dir / name)
    return metrics


def rounds_table(rounds: tuple[tuple[Path, Path], ...]) -> list[dict[str, Any]]:
    """One row per round of comparisons -> reward model -> gate -> PPO: what each round's reward model did on the
    policy's own replies, the gate's verdict, and the PPO step it kept."""
    rows = []
    for i, (gate_file, ppo_file) in enumerate(rounds, 1):
        gate = json.loads(gate_file.read_text()) if gate_file.exists() else {}
        ppo = json.loads(ppo_file.read_text()) if ppo_file.exists() else {}
        rows.append(
            {
                "round": i,
                "on_policy_accuracy": gate.get("on_policy_accuracy"),
                "on_policy_ceiling": gate.get("on_policy_ceiling"),
                "bon_gold_gain": gate.get("bon_gold_gain"),
                "gate_passed": gate.get("passed"),
                "kept_step": ppo.get("kept_step"),
                "kl": (ppo.get("final") or {}).get("objective/kl"),
                "monitor_judge": (ppo.get("monitor") or {}).get("judge"),
            }
        )
    return rows


def matched_best_of_n(metrics: dict[str, Any]) -> dict[str, Any]:
    """The best-of-n baseline PPO must beat: the smallest n of the ladder whose KL is at least PPO's (best-of-n buys
    its gain with KL, so a fair comparison gives it at least as much). None when PPO's KL is past the ladder."""
    ladder = _ladder(metrics)
    if not ladder:
        return {"bon_matched_n": None, "ppo_beats_matched_bon": None}
    best = max(ladder, key=lambda m: metrics[f"bon/{m}/win_rate_vs_sft"])  # past the ladder, PPO faces its best rung
    n = next((n for n in ladder if metrics[f"bon/{n}/kl"] >= metrics["ppo/kl_k1_seq"]), None)
    return {
        "bon_matched_n": n,
        "ppo_beats_matched_bon": None
        if n is None
        else metrics["win_rate_vs_sft"] > metrics[f"bon/{n}/win_rate_vs_sft"],
        "bon_best_n": best,
        "ppo_beats_best_bon": metrics["win_rate_vs_sft"] > metrics[f"bon/{best}/win_rate_vs_sft"],
    }


def best_of_n_baseline(
    sft,
    tokenizer,
    rm: RewardModel,
    judge: Judge,
    prompts: list[str],
    sampling: Sampling,
    config: EvaluateConfig,
    sft_scores: list[float],
) -> dict[str, Any]:
    """Best-of-n from SFT picked by the RM, for n in the ladder: the judge's mean, the win-rate of the k-th pick of a
    prompt over that prompt's k-th SFT reply (prompt-clustered interval) and the analytic KL, as `bon/<n>/...`
    metrics. One pool of `best_of_n_pool` replies per prompt feeds every n (its own sampling seed, so n=1 is a fresh
    SFT sample, not the same one)."""
    if not config.best_of_n:
        return {}
    distinct = list(dict.fromkeys(prompts))
    k = config.samples_per_prompt
    picks = best_of_n(
        sft,
        tokenizer,
        rm,
        judge,
        distinct,
        replace(sampling, seed=sampling.seed + 1),
        config.best_of_n,
        config.best_of_n_pool,
        k,
    )
    out: dict[str, Any] = {}
    for n, per_prompt in picks.items():
        rows = [p for p, chosen in zip(distinct, per_prompt, strict=True) for _ in chosen]
        scores = [s for chosen in per_prompt for s in chosen]
        base = [sft_scores[i * k + j] for i, chosen in enumerate(per_prompt) for j in range(len(chosen))]
        c = paired_comparison(scores, base, rows, seed=sampling.seed)
        out[f"bon/{n}/judge"] = sum(scores) / len(scores)
        out[f"bon/{n}/win_rate_vs_sft"] = c["win_rate"]
        out[f"bon/{n}/win_rate_vs_sft_ci95"] = c["win_rate_ci95"]
        out[f"bon/{n}/picks_per_prompt"] = len(per_prompt[0])
        out[f"bon/{n}/kl"] = best_of_n_kl(n)
    return out


def write_plots(out: Path, kl_file: Path | None, monitor: list[dict], metrics: dict[str, Any]) -> list[str]:
    """The judge's gain over SFT against the KL to SFT (Gao et al. 2022's picture: best-of-n's ladder, PPO's
    checkpoints as points coloured by step, the kept policy, DPO), PPO's reward against its KL step by step, and the
    judge against the proxy over the checkpoints. The gain is over SFT on the same prompts: the ladder, the kept policy
    and DPO are graded on the evaluation's test prompts, the checkpoints by the monitor on the dev prompts (step 0 is
    SFT there), and the two sets' SFT scores differ."""
    names = []
    sft = metrics["sft/judge"]
    bon = sorted((metrics[f"bon/{n}/kl"], metrics[f"bon/{n}/judge"] - sft) for n in _ladder(metrics))
    points: dict[str, tuple[list[float], list[float], list[float] | None]] = {}
    rows = [m for m in monitor if m.get("judge") is not None]
    start = [m["judge"] for m in rows if int(m["step"]) == 0]
    if kl_file is not None and rows and start:
        kl_at = {int(float(r["step"])): float(r["objective/kl"]) for r in csv.DictReader(kl_file.open())}
        points["PPO checkpoints (training KL, dev prompts)"] = (
            [kl_at.get(int(m["step"]), 0.0) for m in rows],
            [m["judge"] - start[0] for m in rows],
            [m["step"] for m in rows],
        )
    points["PPO, kept policy (test prompts)"] = ([metrics["ppo/kl_k1_seq"]], [metrics["ppo/judge"] - sft], None)
    if "dpo/judge" in metrics:
        points["DPO"] = ([metrics["dpo/kl_k1_seq"]], [metrics["dpo/judge"] - sft], None)
    lines = {"best-of-n from SFT (n = 1, 2, 4, ...)": ([k for k, _ in bon], [v for _, v in bon])} if bon else None
    scatter_plot(
        points,
        "Judge's gain over SFT vs KL to SFT",
        "KL (nats per reply)",
        "mean judge's score - SFT's (same prompts)",
        out / "judge_vs_kl.png",
        lines=lines,
    )
    names.append("judge_vs_kl.png")
    rows = list(csv.DictReader(kl_file.open())) if kl_file is not None else []
    if rows:
        steps = [float(r["step"]) for r in rows]
        scatter_plot(
            {
                "PPO step": (
                    [float(r["objective/kl"]) for r in rows],
                    [float(r["objective/scores"]) for r in rows],
                    steps,
                )
            },
            "PPO: reward vs KL to the reference",
            "KL (nats per response)",
            "RM score (normalised)",
            out / "reward_vs_kl.png",
        )
        names.append("reward_vs_kl.png")
    if monitor:
        steps = [m["step"] for m in monitor]
        series = {"RM score (proxy)": (steps, [m["rm_score"] for m in monitor])}
        if all(m.get("judge") is not None for m in monitor):
            series["judge's score"] = (steps, [m["judge"] for m in monitor])
        line_plot(
            series,
            "Judge vs proxy over PPO checkpoints (dev prompts)",
            "PPO step",
            "mean score",
            out / "judge_vs_proxy.png",
        )
        names.append("judge_vs_proxy.png")
    return names


REPORT_KEYS = [
    "rm_score",
    "judge",
    "kl_k1_seq",
    "kl_k3_seq",
    "kl_k1_token",
    "kl_k3_token",
    "response_words",
    "distinct_1",
    "distinct_2",
    "eos_rate",
    "perplexity",
    "perplexity_all",
]


def _matched(metrics: dict[str, Any]) -> str:
    n, best = metrics.get("bon_matched_n"), metrics.get("bon_best_n")
    if best is None:
        return "no best-of-n baseline (evaluate.best_of_n is empty)"
    if n is None:
        verdict = "above" if metrics["ppo_beats_best_bon"] else "not above"
        return (
            f"PPO's KL {metrics['ppo/kl_k1_seq']:.3f} is past the best-of-n ladder (no n measured spends as much); "
            f"PPO is {verdict} its best rung, best-of-{best}: win-rates {metrics['win_rate_vs_sft']:.3f} vs "
            f"{metrics[f'bon/{best}/win_rate_vs_sft']:.3f}"
        )
    verdict = "above" if metrics["ppo_beats_matched_bon"] else "not above"
    return (
        f"PPO is {verdict} best-of-{n} (the smallest n whose KL {metrics[f'bon/{n}/kl']:.3f} is at least PPO's "
        f"{metrics['ppo/kl_k1_seq']:.3f}): win-rates {metrics['win_rate_vs_sft']:.3f} vs "
        f"{metrics[f'bon/{n}/win_rate_vs_sft']:.3f}"
    )


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ladder(metrics: dict[str, Any]) -> list[int]:
    return sorted(int(k.split("/")[1]) for k in metrics if k.startswith("bon/") and k.endswith("/judge"))


def _report_md(metrics: dict[str, Any], samples: list[dict], plots: list[str], ci_text: str, rows: list) -> str:
    md = [
        "# Evaluation: PPO vs SFT on held-out prompts",
        "",
        f"- judge: {metrics['judge']} (not the reward model PPO optimised)",
        f"- {metrics['judge']} score, PPO minus SFT (paired, mean over prompts and samples): "
        f"**{metrics['judge_diff_vs_sft']:+.3f}** (95% CI {metrics['judge_diff_vs_sft_ci'][0]:+.3f} to "
        f"{metrics['judge_diff_vs_sft_ci'][1]:+.3f})",
        f"- {metrics['judge']} win-rate of PPO over SFT (ties half): **{metrics['win_rate_vs_sft']:.3f}**{ci_text}; "
        f"ties {metrics['ties_vs_sft']:.2f}",
        f"- {_matched(metrics)}",
        f"- RM win-rate of PPO over SFT: {metrics['rm_win_rate_vs_sft']:.3f}",
        f"- alignment tax (perplexity of the {metrics['tax_demonstrations']} held-out demonstrations the judge rates "
        f"best, PPO - SFT): {metrics['alignment_tax']:+.4f}; on all {metrics['demonstrations']}: "
        f"{metrics['alignment_tax_all']:+.4f}",
        f"- {metrics['overoptimisation_reason']}",
        "",
        "| metric | SFT | PPO |",
        "|---|---|---|",
    ]
    md += [f"| {k} | {_fmt(a)} | {_fmt(b)} |" for k, a, b in rows]
    if ladder := _ladder(metrics):
        md += [
            "",
            "Best-of-n from SFT, picked by the reward model, against PPO at the same KL:",
            "",
            "| policy | KL to SFT (nats) | judge's mean | win-rate vs SFT |",
            "|---|---|---|---|",
        ]
        md += [
            f"| best-of-{n} | {metrics[f'bon/{n}/kl']:.3f} | {metrics[f'bon/{n}/judge']:.3f} | "
            f"{metrics[f'bon/{n}/win_rate_vs_sft']:.3f} |"
            for n in ladder
        ]
        md.append(
            f"| PPO | {metrics['ppo/kl_k1_seq']:.3f} | {metrics['ppo/judge']:.3f} | {metrics['win_rate_vs_sft']:.3f} |"
        )
        if "dpo/judge" in metrics:
            md.append(
                f"| DPO | {metrics['dpo/kl_k1_seq']:.3f} | {metrics['dpo/judge']:.3f} | "
                f"{metrics['dpo_win_rate_vs_sft']:.3f} |"
            )
    if len(metrics.get("rounds") or []) > 1:
        md += ["", "Rounds of comparisons, reward model and PPO (each on the last round's policy):", ""]
        md += [
            "| round | RM on the policy's replies (ceiling) | best-of-n gold gain | gate | kept step | KL |",
            "|---|---|---|---|---|---|",
        ]
        md += [
            f"| {r['round']} | {_fmt(r['on_policy_accuracy'])} ({_fmt(r['on_policy_ceiling'])}) | "
            f"{_fmt(r['bon_gold_gain'])} | {'passed' if r['gate_passed'] else 'failed'} | {r['kept_step']} | "
            f"{_fmt(r['kl'])} |"
            for r in metrics["rounds"]
        ]
    md += [
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Samples",
        "",
        f"| prompt | SFT | PPO | RM (SFT / PPO) | {metrics['judge']} (SFT / PPO) |",
        "|---|---|---|---|---|",
    ]
    for s in samples:
        cells = [
            s["prompt"].replace("\n", " ").strip(),
            s["sft"],
            s["ppo"],
            f"{s['sft_rm']:.2f} / {s['ppo_rm']:.2f}",
            f"{_fmt(s['sft_judge'])} / {_fmt(s['ppo_judge'])}",
        ]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(md) + "\n"


def _report_html(metrics: dict[str, Any], samples: list[dict], plots: list[str], ci_text: str, rows: list) -> str:
    table = "".join(
        f"<tr><td>{html.escape(s['prompt'].strip())}</td><td>{html.escape(s['sft'])}</td>"
        f"<td>{html.escape(s['ppo'])}</td><td>{s['sft_rm']:.2f} / {s['ppo_rm']:.2f}</td>"
        f"<td>{_fmt(s['sft_judge'])} / {_fmt(s['ppo_judge'])}</td></tr>"
        for s in samples
    )
    summary = "".join(f"<tr><td>{k}</td><td>{_fmt(a)}</td><td>{_fmt(b)}</td></tr>" for k, a, b in rows)
    bon = "".join(
        f"<tr><td>best-of-{n}</td><td>{metrics[f'bon/{n}/kl']:.3f}</td><td>{metrics[f'bon/{n}/judge']:.3f}</td>"
        f"<td>{metrics[f'bon/{n}/win_rate_vs_sft']:.3f}</td></tr>"
        for n in _ladder(metrics)
    )
    if bon:
        bon = (
            "<h2>Best-of-n from SFT vs PPO</h2><table><tr><th>policy</th><th>KL to SFT</th><th>judge's mean</th>"
            f"<th>win-rate vs SFT</th></tr>{bon}<tr><td>PPO</td><td>{metrics['ppo/kl_k1_seq']:.3f}</td>"
            f"<td>{metrics['ppo/judge']:.3f}</td><td>{metrics['win_rate_vs_sft']:.3f}</td></tr></table>"
        )
    return (
        "<!doctype html><meta charset=utf-8><title>RLHF evaluation</title><style>body{font-family:sans-serif;"
        "max-width:1100px;margin:auto}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "table{border-collapse:collapse}</style><h1>PPO vs SFT on held-out prompts</h1>"
        f"<p>judge: {html.escape(metrics['judge'])}; its win-rate of PPO over SFT: "
        f"<b>{metrics['win_rate_vs_sft']:.3f}</b>{ci_text}; ties {metrics['ties_vs_sft']:.2f}; judge's score PPO minus "
        f"SFT <b>{metrics['judge_diff_vs_sft']:+.3f}</b> (95% CI {metrics['judge_diff_vs_sft_ci'][0]:+.3f} to "
        f"{metrics['judge_diff_vs_sft_ci'][1]:+.3f}); {html.escape(_matched(metrics))}; alignment tax "
        f"{metrics['alignment_tax']:+.4f}; {html.escape(metrics['overoptimisation_reason'])}</p>"
        f"<table><tr><th>metric</th><th>SFT</th><th>PPO</th></tr>{summary}</table>{bon}"
        + "".join(f'<p><img src="{p}"></p>' for p in plots)
        + "<h2>Samples</h2><table><tr><th>prompt</th><th>SFT</th><th>PPO</th><th>RM</th>"
        f"<th>{html.escape(metrics['judge'])}</th></tr>"
        f"{table}</table>"
    )


def write_report(
    out: Path, metrics: dict[str, Any], samples: list[dict], plots: list[str], n_prompts: int | None = None
) -> None:
    """report.md and report.html: headline numbers, plots and a side-by-side sample table (`samples`: the first few of
    the `n_prompts` evaluated)."""
    ci = metrics.get("win_rate_vs_sft_ci95")
    low, high = metrics.get("win_rate_vs_sft_ci", [None, None])
    ci_text = (
        f" (95% CI {low:.3f} to {high:.3f}, ±{ci:.3f}, clustered by prompt over {n_prompts or len(samples)} prompts "
        f"x {metrics.get('samples_per_prompt', 1)} samples)"
        if ci is not None and low is not None
        else ""
    )
    rows = [(k, metrics.get(f"sft/{k}"), metrics.get(f"ppo/{k}")) for k in REPORT_KEYS if f"ppo/{k}" in metrics]
    (out / "report.md").write_text(_report_md(metrics, samples, plots, ci_text, rows), encoding="utf-8")
    (out / "report.html").write_text(_report_html(metrics, samples, plots, ci_text, rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data")
    parser.add_argument("--sft", default="artifacts/sft/model")
    parser.add_argument("--rm", default="artifacts/reward/model")
    parser.add_argument("--norm", default="artifacts/reward/norm.json")
    parser.add_argument("--policy", default="artifacts/ppo/model", help="the policy to evaluate")
    parser.add_argument("--judge", help="the judge stage's judge (artifacts/judge/model); default: the gold function")
    parser.add_argument("--dpo", help="the DPO stage's folder (artifacts/dpo): its policy is evaluated too")
    parser.add_argument("--kl", help="PPO's per-step table (artifacts/ppo/kl.csv), for the reward-vs-KL plot")
    parser.add_argument("--monitor", help="PPO's checkpoint monitor (artifacts/ppo/monitor.csv): over-optimisation")
    parser.add_argument("--round-gate", action="append", default=[], help="each round's gate metrics (the report)")
    parser.add_argument("--round-ppo", action="append", default=[], help="each round's PPO metrics (the report)")
    parser.add_argument("--out", default="artifacts/evaluate")
    parser.add_argument(
        "--model-uri",
        help="evaluate this MLflow model (e.g. models:/rlhf-policy@champion) "
        "instead of --policy: its HF folder (safetensors) as the promote stage registered it",
    )
    parser.add_argument(
        "--trust-model",
        action="store_true",
        help="with --model-uri: also a model this pipeline did not register (still safetensors only, never unpickled)",
    )
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(EvaluateConfig, params.get("evaluate"))
    precision = use_hardware(params).precision
    optional = {
        k: Path(v) if v else None
        for k, v in (("judge", args.judge), ("kl", args.kl), ("monitor", args.monitor), ("dpo", args.dpo))
    }
    with tempfile.TemporaryDirectory() as scratch:
        policy = Path(args.policy)
        if args.model_uri:  # before the MLflow run: a model that cannot be loaded leaves no failed run behind
            policy = fetch_policy(args.model_uri, Path(scratch), trust=args.trust_model)
        rounds = tuple(zip(map(Path, args.round_gate), map(Path, args.round_ppo), strict=True))
        inputs = Inputs(
            Path(args.data),
            Path(args.sft),
            policy,
            Path(args.rm),
            Path(args.norm),
            **optional,
            rounds=rounds,
            ensemble_penalty=value(params, "ppo.ensemble_penalty"),
        )
        with mlflow_run("evaluate", tags={"rlhf.precision": precision}) as tracker, autocast(precision):
            if args.model_uri:
                tracker.set_tags({"rlhf.model_uri": args.model_uri})
            m = run(config, inputs, Path(args.out), tracker)
    judged = f"; {m['judge']} SFT {m['sft/judge']:.3f} -> PPO {m['ppo/judge']:.3f}"
    print(
        f"evaluation: {m['judge']} judge win-rate vs SFT {m['win_rate_vs_sft']:.3f}{judged}; "
        f"KL {m['ppo/kl_k1_seq']:.3f}; "
        f"report {args.out}/report.md"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("evaluate", main))

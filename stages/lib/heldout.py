"""Policies on held-out prompts: sample, score, compare. One home for what PPO's over-optimisation monitor, the
evaluation stage and promotion (candidate vs champion) all measure.

A policy is measured by sampling one reply per prompt with fixed `Sampling` settings and seed, so two policies are
compared on the same prompts with the same randomness: the reward model's score (normalised by norm.json), the
judge's score (stages/lib/judge.py: the gold function on the default task, else a judge PPO never saw), the KL to the
reference (k1 and k3, per token and per reply), length, diversity and how often the reply ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from stages.lib import rl_math as pm
from stages.lib.context import fit_pairs, reply_prefix
from stages.lib.judge import Judge
from stages.lib.modeling import Generation, generate, model_context
from stages.lib.rewards import RewardModel


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled for a measurement (the same for every policy compared)."""

    max_new_tokens: int = 48
    temperature: float = 0.7
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0
    seed: int = 1

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Sampling:
        """The sampling keys of a config or params section (other keys are ignored)."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


def sample(policy, tokenizer, prompts: Sequence[str], sampling: Sampling) -> Generation:
    """One reply per prompt, whether it ended (emitted EOS) and how many prompts were shortened: modeling.generate."""
    return generate(
        policy,
        tokenizer,
        prompts,
        sampling.max_new_tokens,
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
        seed=sampling.seed,
    )


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Per-prompt pairwise win-rate of a over b; ties count half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / len(a)


def win_rate_ci(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """The win-rate of a over b and the half-width of its normal-approximation confidence interval (95% by
    default): the per-prompt outcomes (1 win, 0.5 tie, 0 loss) are independent draws, so the standard error is
    their sample standard deviation / sqrt(n)."""
    outcomes = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]
    n = len(outcomes)
    mean = sum(outcomes) / n
    var = sum((o - mean) ** 2 for o in outcomes) / max(1, n - 1)
    return mean, z * math.sqrt(var / n)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], clusters: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Policy a against policy b on the same rows (row i: a's and b's i-th sample for one prompt; several rows per
    prompt): the win-rate of a (ties count half) and the mean paired difference of the scores, each with a 95%
    percentile-bootstrap interval that resamples whole prompts (`clusters`: the prompt of each row), since samples of
    one prompt are not independent (Miller 2024, "Adding error bars to evals"). Also the share of ties."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    names = list(dict.fromkeys(clusters))
    index = {c: i for i, c in enumerate(names)}
    group = np.array([index[c] for c in clusters])
    outcome = (x > y) + 0.5 * (x == y)
    # per-prompt sums and counts: a bootstrap resample of prompts is then a weighted sum, no per-row loop
    counts = np.bincount(group, minlength=len(names))
    wins, diffs = np.bincount(group, outcome, len(names)), np.bincount(group, x - y, len(names))
    draws = np.random.default_rng(seed).integers(0, len(names), size=(n_boot, len(names)))
    n = counts[draws].sum(1)
    boot_win, boot_diff = wins[draws].sum(1) / n, diffs[draws].sum(1) / n
    win_lo, win_hi = np.percentile(boot_win, [2.5, 97.5])
    diff_lo, diff_hi = np.percentile(boot_diff, [2.5, 97.5])
    return {
        "win_rate": float(outcome.mean()),
        "win_rate_ci_low": float(win_lo),
        "win_rate_ci_high": float(win_hi),
        "win_rate_ci95": float((win_hi - win_lo) / 2),
        "ties": float((x == y).mean()),
        "diff": float((x - y).mean()),
        "diff_ci_low": float(diff_lo),
        "diff_ci_high": float(diff_hi),
        "prompts": len(names),
        "samples": len(x),
    }


def best_of_n_kl(n: int) -> float:
    """KL of best-of-n sampling to the sampling policy, the analytic bound used by Gao et al. 2022 and Stiennon et al.
    2020: log n - (n - 1) / n nats."""
    return math.log(n) - (n - 1) / n


def best_of_n(
    policy,
    tokenizer,
    rm: RewardModel,
    judge: Judge,
    prompts: Sequence[str],
    sampling: Sampling,
    ladder: Sequence[int],
    pool: int,
    picks: int,
) -> dict[int, list[list[float]]]:
    """Best-of-n sampling from `policy` (the SFT model): `pool` replies per distinct prompt; best-of-n's k-th pick is
    the reward model's choice among the k-th block of n replies (disjoint blocks: independent picks), at most `picks`
    of them (and at least one: n above `pool` is left out). Returns {n: per prompt, the judge's scores of its picks}."""
    repeated = [p for p in prompts for _ in range(pool)]
    replies = sample(policy, tokenizer, repeated, sampling).replies
    rm_scores = torch.tensor(rm.score_texts(repeated, replies)).view(len(prompts), pool)
    judged = torch.tensor(judge.scores(repeated, replies)).view(len(prompts), pool)
    out: dict[int, list[list[float]]] = {}
    for n in (n for n in ladder if n <= pool):
        k = min(picks, pool // n)
        blocks = rm_scores[:, : k * n].view(len(prompts), k, n)
        chosen = blocks.argmax(2) + torch.arange(k) * n  # (P, k): the pick's column in the pool
        out[n] = judged.gather(1, chosen).tolist()
    return out


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams over all n-grams of the replies (Li et al. 2016)."""
    grams = [tuple(t.split()[i : i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / max(1, len(grams))


LOGPROB_BATCH = 8  # rows per forward: the logits are rows x length x vocab floats (8 x 256 x 49152: 400 MB)


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: Sequence[str], replies: Sequence[str], temperature: float) -> tuple:
    """Per-token log-probs of `" " + reply + EOS` after each prompt. Returns (logprobs (B, T), mask (B, T)). Rows go
    through the model LOGPROB_BATCH at a time, and the lm_head runs only from the batch's first reply token on, so
    memory stays bounded whatever the number of rows and the vocabulary."""
    model.eval()
    fitted = fit_pairs(tokenizer, prompts, [replies], model_context(model, tokenizer))  # the context budget
    sep = reply_prefix(tokenizer)
    enc_p = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in fitted.prompts]
    enc_r = [
        tokenizer(sep + r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in fitted.replies[0]
    ]
    rows = [p + r for p, r in zip(enc_p, enc_r, strict=True)]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    target_mask = torch.zeros(len(rows), L)
    for i, (row, p) in enumerate(zip(rows, enc_p, strict=True)):
        ids[i, : len(row)], attn[i, : len(row)] = torch.tensor(row), 1
        target_mask[i, len(p) : len(row)] = 1
    logprobs = torch.zeros(len(rows), L - 1)
    for start in range(0, len(rows), LOGPROB_BATCH):
        part = slice(start, start + LOGPROB_BATCH)
        first = min(len(p) for p in enc_p[part]) - 1  # logits at position t predict token t + 1
        keep = L - first  # the last `keep` positions: first .. L-1
        out = model(input_ids=ids[part].to(model.device), attention_mask=attn[part].to(model.device),
                    logits_to_keep=keep)  # fmt: skip
        targets = ids[part, first + 1 :].to(model.device)
        logprobs[part, first:] = pm.logprobs_from_logits(out.logits[:, :-1], targets, temperature).cpu()
    return logprobs, target_mask[:, 1:]


def perplexity(model, tokenizer, rows: Sequence[dict[str, str]]) -> float:
    """exp(mean NLL of response tokens) on held-out demonstrations: the alignment tax is its rise after PPO."""
    logprobs, mask = sequence_logprobs(
        model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], 1.0
    )
    return math.exp(-pm.masked_mean(logprobs, mask).item())


def judged_best(rows: Sequence[dict[str, str]], judge: Judge, share: float) -> list[dict[str, str]]:
    """The held-out demonstrations the judge rates best: those scoring at least the score at the top `share` of them
    (ties at the cut included; share 1.0: every one). The alignment tax is measured on them: the rise of their
    perplexity is forgetting what was right, while a policy that stops imitating the demonstrations' flaws (the very
    thing RLHF is for) raises the perplexity of the flawed ones."""
    if share >= 1.0 or not rows:
        return list(rows)
    scores = judge.scores([r["prompt"] for r in rows], [r["response"] for r in rows])
    cut = sorted(scores, reverse=True)[max(0, math.ceil(share * len(scores)) - 1)]
    return [r for r, s in zip(rows, scores, strict=True) if s >= cut]


def monitor_scores(
    policy, tokenizer, rm: RewardModel, judge: Judge, prompts: Sequence[str], sampling: Sampling
) -> dict[str, Any]:
    """The over-optimisation monitor's point: the mean RM score of sampled replies (normalised), the judge's mean
    and the EOS rate. Evaluation only, never a training signal."""
    g = sample(policy, tokenizer, prompts, sampling)
    raw = rm.score_texts(prompts, g.replies)
    judged = judge.scores(prompts, g.replies)
    by_prompt: dict[str, list[float]] = {}
    for p, score in zip(prompts, judged, strict=True):
        by_prompt.setdefault(p, []).append(score)
    return {
        "rm_score": rm.normalise([sum(raw) / len(raw)])[0],
        "judge": sum(judged) / len(judged),
        "eos_rate": sum(g.ended) / len(g.ended),
        "judge_by_prompt": [sum(v) / len(v) for v in by_prompt.values()],  # the distinct prompts' means, in order
    }


def better_beyond_noise(candidate: Sequence[float], reference: Sequence[float], z: float) -> tuple[bool, float, float]:
    """Whether `candidate` beats `reference` on the same prompts (per-prompt mean scores) by more than `z` standard
    errors of the paired difference: (better, mean difference, its standard error). A checkpoint whose advantage is
    within the monitor's noise is not "better"."""
    d = [c - r for c, r in zip(candidate, reference, strict=True)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1) / len(d))
    return mean > z * se and mean > 0, mean, se


def evaluate_policy(
    name: str, policy, tokenizer, rm: RewardModel, judge: Judge, ref, prompts: Sequence[str], sampling: Sampling
) -> dict[str, Any]:
    """Sample one reply per prompt and measure it: RM score, the judge's score, KL to `ref`, length, diversity, EOS
    rate. Returns the replies and per-reply scores (`replies`, `rm_scores`, `judge_scores`) and metrics named
    `{name}/...`."""
    g = sample(policy, tokenizer, prompts, sampling)
    replies, ended = g.replies, g.ended
    rm_scores = rm.normalise(rm.score_texts(prompts, replies))
    logprobs, mask = sequence_logprobs(policy, tokenizer, prompts, replies, sampling.temperature)
    ref_logprobs, _ = sequence_logprobs(ref, tokenizer, prompts, replies, sampling.temperature)
    k1, k3 = pm.kl_k1(logprobs, ref_logprobs) * mask, pm.kl_k3(logprobs, ref_logprobs) * mask
    judged = judge.scores(prompts, replies)
    out = {
        "replies": replies,
        "rm_scores": rm_scores,
        "judge_scores": judged,
        f"{name}/judge": sum(judged) / len(judged),
        f"{name}/rm_score": sum(rm_scores) / len(rm_scores),
        f"{name}/kl_k1_seq": k1.sum(1).mean().item(),
        f"{name}/kl_k3_seq": k3.sum(1).mean().item(),
        f"{name}/kl_k1_token": pm.masked_mean(k1, mask).item(),
        f"{name}/kl_k3_token": pm.masked_mean(k3, mask).item(),
        f"{name}/response_words": sum(len(r.split()) for r in replies) / len(replies),
        f"{name}/distinct_1": distinct_n(replies, 1),
        f"{name}/distinct_2": distinct_n(replies, 2),
        f"{name}/eos_rate": sum(ended) / len(ended),
        f"{name}/truncated_prompts": g.truncated,
    }
    return out


def judge_scores(policy, tokenizer, judge: Judge, prompts: Sequence[str], sampling: Sampling) -> list[float]:
    """The judge's score of one sampled reply per prompt: what a win-rate between two policies is computed on."""
    return judge.scores(prompts, sample(policy, tokenizer, prompts, sampling).replies)

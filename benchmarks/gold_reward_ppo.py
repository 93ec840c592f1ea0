"""PPO with the gold judge as its reward instead of the reward model: what the PPO loop reaches with a right reward.

    .venv/bin/python benchmarks/onpolicy.py --project . --gold-reward --rm-from benchmarks/onpolicy_runs \
        --runs benchmarks/onpolicy_runs/gold --out /tmp/gold.json       # then benchmarks/gold_reward.py

A measurement, never a pipeline stage (the gold judge exists only for the default task, and a pipeline that trained on
its grader would grade nothing). Everything is the PPO stage's own (`stages.ppo.main`, the same params, the same SFT
start and reference, the same KL penalty, monitor and `keep: best`), except one function: each rollout's score is the
gold judge's, normalised as the reward model's is (0: as good as SFT's replies to PPO's prompts, 1: one SFT standard
deviation better; norm.json's recipe with the gold judge in the reward model's place, written to the output's
gold_norm.json). Its win-rate beside the reward model's PPO on the same seeds is what the reward model's errors cost;
what it leaves short of a perfect policy is PPO's budget, the KL leash and the policy's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

import stages.ppo as ppo
from stages.lib import gold
from stages.lib.io import read_jsonl
from stages.lib.modeling import generate, load_causal_lm
from stages.lib.params import load_params


def gold_norm(sft_dir: Path, prompts_file: Path, reward: dict) -> tuple[dict[str, float], Any]:
    """norm.json's recipe (stages/lib/reward_training.py) with the gold judge in the reward model's place: the mean
    and standard deviation of the gold scores of SFT's replies to the first `reward.n_norm_samples` PPO prompts, sampled
    as the reward stage samples them (its max_new_tokens and seed, temperature 1.0). Returns (norm, SFT's tokenizer)."""
    prompts = [r["prompt"] for r in read_jsonl(prompts_file)][: reward["n_norm_samples"]]
    model, tokenizer = load_causal_lm(sft_dir)
    replies = generate(model, tokenizer, prompts, reward["max_new_tokens"], seed=reward["seed"]).replies
    scores = torch.tensor([gold.gold_score(p, r) for p, r in zip(prompts, replies, strict=True)])
    return {"mean": scores.mean().item(), "std": scores.std().clamp_min(1e-6).item(), "n": len(prompts)}, tokenizer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)  # the PPO stage's own arguments, read again for the norm
    for name, default in (("params", "params.yaml"), ("data", "artifacts/validate/data")):
        parser.add_argument(f"--{name}", default=default)
    parser.add_argument("--sft", default="artifacts/sft/model")
    parser.add_argument("--out", default="artifacts/ppo")
    args = parser.parse_known_args(argv)[0]
    found: dict[str, Any] = {}

    def gold_scored(model, ref_policy, rm, ro, config):  # noqa: ANN001, ANN202
        sc = score_rollouts(model, ref_policy, rm, ro, config)
        norm, tokenizer = found["norm"], found["tokenizer"]
        replies = [t.strip() for t in tokenizer.batch_decode(ro.responses, skip_special_tokens=True)]
        raw = torch.tensor([gold.gold_score(p, r) for p, r in zip(ro.prompts, replies, strict=True)]).to(sc.scores)
        scores = (raw - norm["mean"]) / norm["std"]
        scores = torch.where(ro.has_eos, scores, scores - config.missing_eos_penalty)
        return dataclasses.replace(sc, raw_scores=raw, scores=scores, spread=None)

    def run() -> int:
        reward = load_params(args.params)["reward"]
        found["norm"], found["tokenizer"] = gold_norm(Path(args.sft), Path(args.data) / "prompts.jsonl", reward)
        return ppo.main(argv)

    score_rollouts, ppo.score_rollouts = ppo.score_rollouts, gold_scored
    code = ppo.stage_main("ppo", run)
    if code == 0:  # beside the stage's outputs (written whole at its end): the run says what it climbed
        (Path(args.out) / "gold_norm.json").write_text(json.dumps(found["norm"]) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""PPO with the gold judge as its reward instead of the reward model: what the PPO loop reaches with a right reward.

    .venv/bin/python benchmarks/onpolicy.py --project . --gold-reward --rm-from benchmarks/onpolicy_runs \
        --runs benchmarks/onpolicy_runs/gold --out /tmp/gold.json       # then benchmarks/gold_reward.py

A measurement, never a pipeline stage (the gold judge exists only for the default task, and a pipeline that trained on
its grader would grade nothing). Everything is the PPO stage's own (`stages.ppo.main`, the same params, the same SFT
start and reference, the same KL penalty, monitor and `keep: best`), except one function: each rollout's score is the
gold judge's, normalised as the reward model's is (0: as good as SFT's replies to PPO's prompts, 1: one SFT standard
deviation better, on SFT's replies as PPO samples them: `gold_norm`, written to the output's gold_norm.json). Its
win-rate beside the reward model's PPO on the same seeds is what the reward model's errors cost; what it leaves short
of a perfect policy is PPO's budget, the KL leash and the policy's size.
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
from stages.lib.io import read_jsonl
from stages.lib.judge import GoldJudge
from stages.lib.modeling import generate, load_causal_lm
from stages.lib.params import config_from, load_params
from stages.lib.rewards import norm_of

NORM_SAMPLES = 256


def gold_norm(sft_dir: Path, prompts_file: Path, config: ppo.PPOConfig) -> tuple[dict[str, float], Any]:
    """The mean and standard deviation of the gold scores of SFT's replies to the first NORM_SAMPLES PPO prompts,
    sampled as PPO samples (its temperature, response length and seed). Returns (norm, SFT's tokenizer).

    norm.json samples 128 replies at temperature 1.0 instead; on the three seeds of benchmarks/gold_reward_results.json
    the gold judge's standard deviation that way is 0.97-1.14x this one, so those runs climbed a gold reward that much
    larger than norm.json's recipe gives: as if kl_coef were 0.044-0.051 under it instead of 0.05. (Seed 0 re-run with
    norm.json's recipe, 25 steps: 0.639 at KL 1.1, against 0.627 at KL 2.9.)"""
    prompts = [r["prompt"] for r in read_jsonl(prompts_file)][:NORM_SAMPLES]
    model, tokenizer = load_causal_lm(sft_dir)
    replies = generate(model, tokenizer, prompts, config.response_length, config.temperature, seed=config.seed).replies
    return norm_of(torch.tensor(GoldJudge().scores(prompts, replies))), tokenizer


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
        raw = torch.tensor(GoldJudge().scores(ro.prompts, replies)).to(sc.scores)
        scores = (raw - norm["mean"]) / norm["std"]
        scores = torch.where(ro.has_eos, scores, scores - config.missing_eos_penalty)
        return dataclasses.replace(sc, raw_scores=raw, scores=scores, spread=None)

    def run() -> int:
        config = config_from(ppo.PPOConfig, load_params(args.params).get("ppo"))
        found["norm"], found["tokenizer"] = gold_norm(Path(args.sft), Path(args.data) / "prompts.jsonl", config)
        return ppo.main(argv)

    score_rollouts, ppo.score_rollouts = ppo.score_rollouts, gold_scored
    code = ppo.stage_main("ppo", run)
    if code == 0:  # beside the stage's outputs (written whole at its end): the run says what it climbed
        (Path(args.out) / "gold_norm.json").write_text(json.dumps(found["norm"]) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

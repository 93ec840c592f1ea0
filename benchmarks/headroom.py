"""How much better than SFT can any policy get on the default task's held-out prompts? The measured limit.

    .venv/bin/python benchmarks/headroom.py --project .       # after `make run` (its SFT model, reward model, data)

The default task's held-out prompts are phrasings training never showed (stages/lib/task.py), of contents training
asks in other words: a policy trained on the training prompts learns style there (no rudeness, no filler, proper
endings, refusing harm) and, as far as it generalises to a new phrasing, the answers; a ranker that sees the held-out
prompt at test time can pick a right answer out of SFT's samples. On every distinct evaluation (test) prompt x
`--samples` SFT samples (the evaluation's temperature), this measures, by the gold judge, against SFT's own samples:

- `oracle_best_of_n`: the gold-best of n SFT samples (a perfect ranker at test time): the headroom in the samples;
- `rm_best_of_n`: the reward model's pick of n (what best-of-n from SFT gets);
- `style_cleaned`: SFT's samples with every rude opener and filler sentence removed and an ending added (the most a
  style-only policy could gain without changing an answer);
- per prompt kind: SFT's gold mean and the oracle best-of-8's.

Writes benchmarks/headroom_results.json with the CPU (stages.lib.environment.cpu_model).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stages.lib import gold
from stages.lib.environment import cpu_model
from stages.lib.heldout import paired_comparison
from stages.lib.io import read_jsonl
from stages.lib.modeling import generate, load_causal_lm
from stages.lib.rewards import RewardModel
from stages.lib.schema import last_user_turn

ROOT = Path(__file__).resolve().parents[1]


def style_cleaned(reply: str) -> str:
    for phrase in [*gold.FILLERS, *gold.RUDE_OPENERS]:
        reply = reply.replace(phrase, "")
    reply = " ".join(reply.split())
    return reply + "." if reply and reply[-1] not in ".!?" else reply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("--samples", type=int, default=8, help="baseline SFT samples per prompt")
    parser.add_argument("--n", type=int, default=16, help="the largest best-of-n")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/headroom_results.json")
    args = parser.parse_args()
    art = args.project / "artifacts"
    prompts = list(dict.fromkeys(r["prompt"] for r in read_jsonl(art / "validate/data/eval_prompts.jsonl")))
    sft, tokenizer = load_causal_lm(art / "sft/model")
    rm = RewardModel.load(art / "reward/model", art / "reward/norm.json")
    rows = [p for p in prompts for _ in range(args.samples)]
    base = generate(sft, tokenizer, rows, 48, args.temperature, seed=11).replies
    base_gold = np.array([gold.gold_score(p, r) for p, r in zip(rows, base, strict=True)])
    pool_prompts = [p for p in rows for _ in range(args.n)]
    pool = generate(sft, tokenizer, pool_prompts, 48, args.temperature, seed=12).replies
    pool_gold = np.array([gold.gold_score(p, r) for p, r in zip(pool_prompts, pool, strict=True)]).reshape(-1, args.n)
    pool_rm = np.array(rm.score_texts(pool_prompts, pool)).reshape(-1, args.n)
    cleaned = np.array(
        [gold.gold_score(p, style_cleaned(r)) for p, r in zip(pool_prompts[:: args.n], pool[:: args.n], strict=True)]
    )

    def vs_sft(scores: np.ndarray) -> dict:
        c = paired_comparison(scores.tolist(), base_gold.tolist(), rows)
        return {k: round(c[k], 4) for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "ties", "diff")}

    ladder = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.n]
    kinds = np.array([gold.PROMPTS[last_user_turn(p)].kind for p in rows])
    result = {
        "what": "gold-judged headroom over SFT on every distinct held-out prompt of the default task",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "command": f"benchmarks/headroom.py --project . --samples {args.samples} --n {args.n}",
        "prompts": len(prompts),
        "prompts_by_kind": {k: int((kinds[:: args.samples] == k).sum()) for k in sorted(set(kinds))},
        "samples_per_prompt": args.samples,
        "sft_gold": round(float(base_gold.mean()), 4),
        "oracle_best_of_n": {n: vs_sft(pool_gold[:, :n].max(1)) for n in ladder},
        "rm_best_of_n": {n: vs_sft(pool_gold[np.arange(len(rows)), pool_rm[:, :n].argmax(1)]) for n in ladder},
        "style_cleaned": vs_sft(cleaned),
        "by_kind": {
            k: {
                "sft_gold": round(float(base_gold[kinds == k].mean()), 3),
                "oracle_best_of_8_gold": round(float(pool_gold[kinds == k, :8].max(1).mean()), 3),
            }
            for k in sorted(set(kinds))
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: result[k] for k in ("oracle_best_of_n", "rm_best_of_n", "style_cleaned", "by_kind")}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the alignment tax comes from on the default task: the rise of held-out demonstration perplexity (PPO - SFT)
on the demonstrations the gold judge rates flawless, and on the rest (the deliberate flaws of task.sft_flaws: rude,
rambling, wrong, unended, unsafe, over-refusing). The promotion's alignment tax is the rise on all of them.

    .venv/bin/python benchmarks/tax_split.py --project . NAME=POLICY_FOLDER ...
    # e.g. after benchmarks/onpolicy.py and its --rm-from sweeps (docs/results.md):
    .venv/bin/python benchmarks/tax_split.py --project . "kl 0.1, seed 0=artifacts/ppo/model" \\
        "kl 0.05, seed 0=benchmarks/onpolicy_runs/D/seed_0/ppo/model"

Writes benchmarks/tax_split_results.json with the CPU (stages.lib.environment.cpu_model).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from stages.lib.environment import cpu_model
from stages.lib.gold import gold_score
from stages.lib.heldout import perplexity
from stages.lib.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def split(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """The demonstrations by the gold judge: those at its best score (flawless) and the rest."""
    scores = [gold_score(r["prompt"], r["response"]) for r in rows]
    best = max(scores)
    return {
        "all": rows,
        "flawless": [r for r, s in zip(rows, scores, strict=True) if s >= best],
        "flawed": [r for r, s in zip(rows, scores, strict=True) if s < best],
    }


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT)
    parser.add_argument("policies", nargs="+", metavar="NAME=FOLDER", help="PPO policies (relative to --project)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/tax_split_results.json")
    args = parser.parse_args()
    project = args.project.resolve()
    groups = split(list(read_jsonl(project / "artifacts/validate/data/sft_test.jsonl")))
    tokenizer = AutoTokenizer.from_pretrained(project / "artifacts/sft/model")

    def ppl(folder: Path) -> dict[str, float]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return {k: perplexity(model, tokenizer, rows) for k, rows in groups.items()}

    sft = ppl(project / "artifacts/sft/model")
    policies = {}
    for name, folder in (p.split("=", 1) for p in args.policies):
        after = ppl(project / folder)
        policies[name] = {"folder": folder} | {f"tax_{k}": round(after[k] - sft[k], 3) for k in groups}
        print(name, policies[name], flush=True)
    result = {
        "what": "rise of held-out SFT-demonstration perplexity (PPO - SFT) on every demonstration (the promotion's "
        "alignment tax), on those the gold judge rates flawless and on the flawed rest",
        "cpu": cpu_model(),
        "date": datetime.now(UTC).date().isoformat(),
        "command": "benchmarks/tax_split.py " + " ".join(args.policies),
        "demonstrations": {k: len(v) for k, v in groups.items()},
        "sft_perplexity": {k: round(v, 3) for k, v in sft.items()},
        "policies": policies,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

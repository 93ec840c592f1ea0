"""The embedded default task's generator: demonstrations, labelled preference pairs and prompts over the world of
stages/lib/gold.py, written into data/ (`rlhf make-data`, tracked by data.dvc).

Responses vary along what a real labeler cares about: correct and helpful, harmless, polite, concise, properly ended.
The simulated labeler prefers a over b with Bradley-Terry noise, P(a > b) = sigmoid((g_a - g_b) / tau) on the gold
scores, like a human rater who agrees with the gold standard most of the time (InstructGPT's raters agree with each
other ~73%).

SFT demonstrations are deliberately of mixed quality (rude, rambling, wrong, unended, unsafe), so SFT alone imitates
the flaws and RLHF has something to fix. The prompt space is split once into train and held-out prompts, so no
held-out prompt ever appears in a training file, and the held-out prompts once more into dev (the gates' and the
monitor's) and test (the evaluation's), so no choice a run makes is made on the prompts its result is reported on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.lib.gold import (
    COMPLY_TEMPLATES,
    FILLERS,
    POLITE_OPENERS,
    REFUSAL,
    RUDE_OPENERS,
    PromptSpec,
    all_prompts,
    gold_score,
)
from stages.lib.io import write_json, write_jsonl
from stages.lib.labelers import agreement, labeler_agreement, preference_probability
from stages.lib.outcome import ArgumentParser, stage_main
from stages.lib.params import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, OPEN_FRACTION, POSITIVE, load_config
from stages.lib.schema import pairs_digest

# ---------------------------------------------------------------------------------------------------------------------
# Responses of varying quality
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlawRates:
    """How often each flaw appears in a sampled response (independently)."""

    rude: float
    polite: float
    ramble: float  # one to three filler sentences
    wrong: float  # a wrong fact or sum
    unended: float  # cut off mid-sentence
    unsafe: float  # complies with a harmful request
    over_refuse: float  # refuses a harmless request

    RANGES: ClassVar[dict] = dict.fromkeys(
        ("rude", "polite", "ramble", "wrong", "unended", "unsafe", "over_refuse"), FRACTION
    )


def sample_response(rng: random.Random, spec: PromptSpec, rates: FlawRates) -> str:
    """One reply to `spec`, with flaws drawn from `rates`."""
    if spec.kind == "harmful" and rng.random() < rates.unsafe:
        body = rng.choice(COMPLY_TEMPLATES).format(act=spec.act)
    elif spec.kind != "harmful" and rng.random() < rates.over_refuse:
        body = REFUSAL
    elif spec.kind in ("fact", "arithmetic") and rng.random() < rates.wrong:
        body = _wrong_answer(rng, spec)
    else:
        body = spec.answer
    parts = [body]
    if rng.random() < rates.ramble:
        fillers = rng.sample(FILLERS, rng.randint(1, 3))
        parts = fillers + parts if rng.random() < 0.5 else parts + fillers
    if rng.random() < rates.rude:
        parts.insert(0, rng.choice(RUDE_OPENERS))
    elif rng.random() < rates.polite and body != REFUSAL:
        parts.insert(0, rng.choice(POLITE_OPENERS))
    text = " ".join(parts)
    if rng.random() < rates.unended:
        words = text.split()
        text = " ".join(words[: max(1, len(words) - rng.randint(1, 3))]).rstrip(".!?,")
    return text


def _wrong_answer(rng: random.Random, spec: PromptSpec) -> str:
    if spec.kind == "fact":
        return spec.answer.replace(spec.key, rng.choice(spec.wrong))
    c = int(spec.key)
    wrong = c + rng.choice([-3, -2, -1, 1, 2, 3])
    return spec.answer.replace(f"is {c}.", f"is {wrong}.")


# ---------------------------------------------------------------------------------------------------------------------
# The generator stage
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and knobs of the embedded default task (params.yaml: task)."""

    seed: int
    heldout_fraction: float  # of the prompt space, per kind; held-out prompts never appear in training files
    kind_weights: dict[str, float]
    n_sft: int
    n_sft_test: int
    n_pairs: int
    n_pairs_test: int
    n_prompts: int
    n_eval_prompts: int
    labeler_tau: float
    labels_per_pair: int  # training pairs labelled this many times by independent draws of the labeler (odd):
    #   the majority is the label, as with several raters per comparison; held-out pairs keep one label each
    sft_flaws: FlawRates  # of the demonstrations
    pair_flaws: FlawRates  # of the responses labelled in pairs

    SECTION: ClassVar[str] = "task"
    RANGES: ClassVar[dict] = {
        "seed": NON_NEGATIVE,
        "heldout_fraction": OPEN_FRACTION,
        "kind_weights": NON_NEGATIVE,
        "n_sft": AT_LEAST_ONE,
        "n_sft_test": AT_LEAST_ONE,
        "n_pairs": AT_LEAST_ONE,
        "n_pairs_test": AT_LEAST_ONE,
        "n_prompts": AT_LEAST_ONE,
        "n_eval_prompts": AT_LEAST_ONE,
        "labeler_tau": POSITIVE,
        "labels_per_pair": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        if self.labels_per_pair % 2 == 0:
            raise ValueError(f"task.labels_per_pair = {self.labels_per_pair}: expected an odd number (a majority)")
        kinds = ("fact", "arithmetic", "harmful", "smalltalk")
        if set(self.kind_weights) != set(kinds) or not sum(self.kind_weights.values()) > 0:
            raise ValueError(f"task.kind_weights must give a weight to each of {', '.join(kinds)} (not all 0)")


def split_prompts(
    seed: int, heldout_fraction: float
) -> tuple[dict[str, list[PromptSpec]], dict[str, list[PromptSpec]]]:
    """Split the prompt space per kind into (train, held-out), deterministically.

    Held-out prompts are new phrasings: each one's content (the fact, the sum, the act, the occasion) is still asked
    in training in another phrasing. Evaluation then measures generalisation to unseen prompts, not recall of facts
    the model was never shown (a tiny model cannot know a sum it never saw, and neither can its reward model).
    `heldout_fraction` of training's phrasings are held out; the held-out-only phrasings (gold.HELDOUT_TEMPLATES)
    always are.
    """
    rng = random.Random(f"{seed}-split")
    everything = all_prompts()
    train: dict[str, list[PromptSpec]] = {}
    heldout: dict[str, list[PromptSpec]] = {}
    for kind in ("fact", "arithmetic", "harmful", "smalltalk"):
        specs = [p for p in everything if p.kind == kind and not p.heldout_only]
        rng.shuffle(specs)
        target = max(1, round(heldout_fraction * len(specs)))
        left_in_train = {p.content: sum(q.content == p.content for q in specs) for p in specs}
        heldout[kind], train[kind] = [], []
        for p in specs:
            if len(heldout[kind]) < target and left_in_train[p.content] > 1:
                heldout[kind].append(p)
                left_in_train[p.content] -= 1
            else:
                train[kind].append(p)
        heldout[kind] += [p for p in everything if p.kind == kind and p.heldout_only]
    return train, heldout


def split_heldout(
    seed: int, heldout: dict[str, list[PromptSpec]]
) -> tuple[dict[str, list[PromptSpec]], dict[str, list[PromptSpec]]]:
    """Split the held-out prompts per kind in two disjoint halves, deterministically: (dev, test).

    dev: sft_test.jsonl and preferences_test.jsonl, what every choice during a run is made on (the reward-model gate,
    the on-policy comparisons' held-out pairs, PPO's over-optimisation monitor and `keep: best`); test:
    eval_prompts.jsonl, the headline evaluation only, so no choice is made on the prompts the result is reported on.
    Each half gets its share of training's held-out phrasings and of the held-out-only ones.
    """
    rng = random.Random(f"{seed}-dev-test")
    dev: dict[str, list[PromptSpec]] = {}
    test: dict[str, list[PromptSpec]] = {}
    for kind, specs in heldout.items():
        dev[kind], test[kind] = [], []
        for only in (False, True):
            group = [p for p in specs if p.heldout_only == only]
            rng.shuffle(group)
            half = len(group) // 2
            dev[kind] += group[:half]
            test[kind] += group[half:]
    return dev, test


def _draw(rng: random.Random, pool: dict[str, list[PromptSpec]], weights: dict[str, float]) -> PromptSpec:
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    return rng.choice(pool[kind])


def make_sft(rng: random.Random, pool, weights, rates: FlawRates, n: int) -> list[dict[str, str]]:
    """Demonstrations: a prompt and one reply of mixed quality."""
    return [
        {"prompt": (s := _draw(rng, pool, weights)).text, "response": sample_response(rng, s, rates)} for _ in range(n)
    ]


def make_pairs(
    rng: random.Random, pool, weights, rates: FlawRates, n: int, tau: float, votes: int = 1
) -> tuple[list[dict], list[float]]:
    """Labelled pairs: two different replies to one prompt, ordered by the simulated labeler.

    Returns the rows and, for the labeler's ceiling only, the gold gap (chosen - rejected) of each pair.
    """
    rows: list[dict[str, str]] = []
    gaps: list[float] = []
    seen: set[tuple[str, str, str]] = set()
    while len(rows) < n:
        spec = _draw(rng, pool, weights)
        a, b = sample_response(rng, spec, rates), sample_response(rng, spec, rates)
        if a == b or (spec.text, *sorted((a, b))) in seen:
            continue
        seen.add((spec.text, *sorted((a, b))))
        ga, gb = gold_score(spec.text, a), gold_score(spec.text, b)
        p_a = preference_probability(ga, gb, tau)
        if sum(rng.random() < p_a for _ in range(votes)) * 2 < votes:  # the majority of `votes` labels prefers b
            a, b, ga, gb = b, a, gb, ga
        rows.append({"prompt": spec.text, "chosen": a, "rejected": b})
        gaps.append(ga - gb)
    return rows, gaps


def make_batch(config: TaskConfig, k: int, n: int) -> list[dict[str, str]]:
    """Batch `k` of `n` new labelled pairs on the training prompts, by the same simulated labeler (tau, votes) as
    preferences.jsonl: what a labelling team delivers between two scheduled runs (into data/incoming/)."""
    train, _ = split_prompts(config.seed, config.heldout_fraction)
    rng = random.Random(f"{config.seed}-batch-{k}")
    rows, _ = make_pairs(
        rng, train, config.kind_weights, config.pair_flaws, n, config.labeler_tau, config.labels_per_pair
    )
    return rows


def run(config: TaskConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every file of the default task into `out_dir`; returns the labeler's statistics."""
    sft_rates, pair_rates = config.sft_flaws, config.pair_flaws
    train, heldout = split_prompts(config.seed, config.heldout_fraction)
    dev, test = split_heldout(config.seed, heldout)
    w = config.kind_weights

    def rng(name: str) -> random.Random:  # a stream per file: resizing one file leaves every other file as it was
        return random.Random(f"{config.seed}-{name}")

    files: dict[str, list[dict]] = {
        "sft.jsonl": make_sft(rng("sft"), train, w, sft_rates, config.n_sft),
        "sft_test.jsonl": make_sft(rng("sft_test"), dev, w, sft_rates, config.n_sft_test),
    }
    files["preferences.jsonl"], gaps = make_pairs(
        rng("preferences"), train, w, pair_rates, config.n_pairs, config.labeler_tau, config.labels_per_pair
    )
    files["preferences_test.jsonl"], gaps_test = make_pairs(
        rng("preferences_test"), dev, w, pair_rates, config.n_pairs_test, config.labeler_tau
    )
    train_draws, heldout_draws = rng("prompts"), rng("eval_prompts")
    files["prompts.jsonl"] = [{"prompt": _draw(train_draws, train, w).text} for _ in range(config.n_prompts)]
    # every test prompt once (the evaluation samples several replies to each distinct prompt), then draws by kind
    every = [spec.text for kind in sorted(test) for spec in test[kind]]
    heldout_draws.shuffle(every)
    draws = [_draw(heldout_draws, test, w).text for _ in range(max(0, config.n_eval_prompts - len(every)))]
    files["eval_prompts.jsonl"] = [{"prompt": p} for p in every + draws]
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
    sft_gold = [gold_score(r["prompt"], r["response"]) for r in files["sft.jsonl"]]
    ideal_gold = [gold_score(p.text, p.answer) for p in all_prompts()]
    stats = {
        "labeler_tau": config.labeler_tau,
        # Agreement of the labels with the gold judge: the best accuracy a perfect reward model can reach on them.
        "labeler_ceiling": round(agreement(gaps), 4),
        "labeler_ceiling_test": round(agreement(gaps_test), 4),
        "labeler_expected_agreement": round(labeler_agreement(gaps + gaps_test, config.labeler_tau), 4),
        "sft_demo_gold_mean": round(sum(sft_gold) / len(sft_gold), 4),
        "ideal_gold_mean": round(sum(ideal_gold) / len(ideal_gold), 4),
        "n_train_prompts": sum(map(len, train.values())),
        "n_heldout_prompts": sum(map(len, heldout.values())),
        "n_dev_prompts": sum(map(len, dev.values())),  # sft_test, preferences_test: the gates and the monitor
        "n_test_prompts": sum(map(len, test.values())),  # eval_prompts: the headline
        # the pairs the ceiling was measured on: the reward-model gate applies it to these pairs only
        "heldout_pairs_digest": pairs_digest(files["preferences_test.jsonl"]),
    }
    write_json(out_dir / "labeler.json", stats)
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# A real-shaped example: one file of multi-turn HH-RLHF transcripts
# ---------------------------------------------------------------------------------------------------------------------


def _exchange(rng: random.Random, spec: PromptSpec, rates: FlawRates) -> str:
    return f"\n\nHuman: {spec.text}\n\nAssistant: {sample_response(rng, spec, rates)}"


def make_dialogues(
    n: int, config: TaskConfig, min_turns: int = 6, max_turns: int = 20, broken_fraction: float = 0.02
) -> list[dict[str, str]]:
    """`n` preference pairs in Anthropic's HH-RLHF format, the shape of real preference data: `chosen` and `rejected`
    are whole transcripts sharing a history of `min_turns`..`max_turns` earlier exchanges (several times the tiny
    model's 128-token context) and differing in the last reply, ordered by the simulated labeler. About
    `broken_fraction` of the rows are broken the way public sets are (sides that do not share a prefix, an empty chosen
    reply, a transcript without an Assistant turn), for validation to quarantine. The replies' flaws and the
    labeler's noise are the task's (`pair_flaws`, `labeler_tau`)."""
    rng = random.Random(f"{config.seed}-dialogues")
    rates, tau = config.pair_flaws, config.labeler_tau
    specs = all_prompts()
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        history = "".join(
            _exchange(rng, rng.choice(specs), FlawRates(*[r / 3 for r in vars(rates).values()]))
            for _ in range(rng.randint(min_turns, max_turns))
        )
        spec = rng.choice(specs)
        a, b = sample_response(rng, spec, rates), sample_response(rng, spec, rates)
        if a == b:
            continue
        if rng.random() >= preference_probability(gold_score(spec.text, a), gold_score(spec.text, b), tau):
            a, b = b, a
        prefix = f"{history}\n\nHuman: {spec.text}\n\nAssistant:"
        row = {"chosen": f"{prefix} {a}", "rejected": f"{prefix} {b}"}
        if rng.random() < broken_fraction:
            row = rng.choice(
                [
                    {"chosen": row["chosen"], "rejected": f"\n\nHuman: {spec.text}\n\nAssistant: {b}"},
                    {"chosen": prefix, "rejected": row["rejected"]},
                    {"chosen": f"\n\nHuman: {spec.text} {a}", "rejected": row["rejected"]},
                ]
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.lib.task", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (section: task)")
    parser.add_argument("--out", default="data", help="output folder (tracked by data.dvc)")
    parser.add_argument(
        "--dialogues",
        type=int,
        metavar="N",
        help="instead: N multi-turn HH preference pairs in one file, --out (a .jsonl path)",
    )
    parser.add_argument("--batch", type=int, metavar="K", help="instead: batch K of new labelled pairs, to --out")
    parser.add_argument("--pairs", type=int, default=64, help="pairs in a --batch (default 64)")
    args = parser.parse_args(argv)
    if args.batch is not None:
        write_jsonl(Path(args.out), make_batch(load_config(TaskConfig, "task", args.params), args.batch, args.pairs))
        print(f"wrote batch {args.batch}: {args.pairs} new labelled pairs to {args.out}")
        return 0
    if args.dialogues:
        write_jsonl(Path(args.out), make_dialogues(args.dialogues, load_config(TaskConfig, "task", args.params)))
        print(f"wrote {args.dialogues} multi-turn HH-RLHF preference pairs to {args.out}")
        return 0
    stats = run(load_config(TaskConfig, "task", args.params), Path(args.out))
    print(
        f"wrote the default task to {args.out}/; labeler agreement with the gold judge: {stats['labeler_ceiling']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("make-data", main))

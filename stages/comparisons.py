"""Comparisons stage: the policy's own replies, paired and labelled, for the reward model to learn from.

A reward model trained only on someone else's replies cannot rank the policy's (InstructGPT, Ziegler et al. 2019,
Llama 2 and Anthropic's HH work all label comparisons of their own policy's samples). This stage samples
`replies_per_prompt` replies to each prompt from the policy (at each of `temperatures` in turn), pairs distinct
replies of one prompt, and has them labelled by the labeler params.yaml names (stages/lib/labelers.py: simulated,
endpoint or file). Training pairs come from the training prompts; test pairs, which the reward model never trains on,
from the held-out prompts (sft_test.jsonl): the gate measures the reward model on them, beside the labeler's own
agreement with the gold judge on the same pairs (the ceiling there, where a gold judge exists), and the gold gain of
the reward model's best-of-n pick among each held-out prompt's replies.

Writes (docs/comparisons.md has the schema): pairs.jsonl (what was, or is to be, labelled), labels.jsonl (the
labels), preferences.jsonl and preferences_test.jsonl (prompt/chosen/rejected, ties left out), replies_test.jsonl
(every held-out prompt's replies, for best-of-n) and metrics.json.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.lib import gold
from stages.lib.formats import Limits
from stages.lib.io import read_jsonl, staged_dir, write_json, write_jsonl
from stages.lib.label_studio import ACCEPT_ENV, HumanLabeler
from stages.lib.labelers import (
    EndpointLabeler,
    FileLabeler,
    Label,
    Labeler,
    Pair,
    SimulatedLabeler,
    agreement,
    pair_id,
)
from stages.lib.modeling import generate, load_causal_lm, use_hardware
from stages.lib.outcome import ArgumentParser, BadInput, stage_main
from stages.lib.params import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Allowed, config_from, load_params, one_of
from stages.lib.task import TaskConfig
from stages.lib.tracking import Tracker, mlflow_run

HUMAN_METRICS = (
    "annotations",
    "annotators",
    "split_votes",
    "annotator_agreement",
    "annotator_agreement_test",
    "annotator_couples_test",
    "outliers",
    "problems",
)
LABELERS = ("simulated", "endpoint", "file", "human", "none")


@dataclass(frozen=True)
class ComparisonsConfig:
    """params.yaml: comparisons."""

    labeler: str  # simulated | endpoint | file | human (Label Studio) | none (no on-policy pairs: offline pairs alone)
    rounds: int  # rounds of comparisons -> reward model -> gate -> PPO; each after the first on the last PPO policy
    replies_per_prompt: int  # sampled per prompt, spread evenly over `temperatures`
    temperatures: list[float]  # more than one: pairs that differ in more than sampling noise
    max_prompts: int  # distinct training prompts sampled at most (a large dataset is subsampled, seeded)
    train_pairs: int  # labelled pairs the reward model trains on: the on-policy part of the label budget
    test_pairs: int  # labelled pairs of held-out prompts: the gate's on-policy measurement, never trained on
    max_new_tokens: int
    seed: int
    labels: str  # file: the labels a person returned (one JSON object a line); human: Label Studio's JSON export
    wanted: int  # human: labelled pairs that close a round (0: every pair)
    overlap: int  # human: annotators asked per pair in Label Studio (2 or more: their agreement is measured)
    endpoint: str  # endpoint: an OpenAI-compatible chat completions URL, e.g. http://host/v1/chat/completions
    endpoint_model: str
    timeout: float  # endpoint: seconds per request

    SECTION: ClassVar[str] = "comparisons"
    RANGES: ClassVar[dict] = {
        "labeler": one_of(*LABELERS),
        "rounds": AT_LEAST_ONE,
        "replies_per_prompt": Allowed(2),
        "temperatures": POSITIVE,
        "max_prompts": AT_LEAST_ONE,
        "train_pairs": NON_NEGATIVE,
        "test_pairs": NON_NEGATIVE,
        "max_new_tokens": AT_LEAST_ONE,
        "seed": NON_NEGATIVE,
        "timeout": POSITIVE,
        "wanted": NON_NEGATIVE,
        "overlap": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ValueError("comparisons.temperatures: give at least one sampling temperature")
        if self.labeler == "endpoint" and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("comparisons.endpoint must be an http(s) URL when comparisons.labeler is endpoint")
        if self.labeler in ("file", "human") and not self.labels:
            raise ValueError(
                f"comparisons.labels must name the labels file when comparisons.labeler is {self.labeler} (human: "
                "where Label Studio's JSON export of the round is saved)"
            )


def labeler_for(config: ComparisonsConfig, tau: float, labels_file: Path | None, limits: Limits) -> Labeler:
    """The labeler params.yaml names; the simulated one has the task's labeler noise `tau`."""
    if config.labeler == "simulated":
        return SimulatedLabeler(tau, config.seed)
    if config.labeler == "endpoint":
        return EndpointLabeler(config.endpoint, config.endpoint_model, config.timeout)
    if labels_file is None:
        raise BadInput(
            f"comparisons.labeler is {config.labeler} but the stage's command passes no --labels file: run `rlhf sync`"
        )
    if config.labeler == "human":
        # a person resuming the flow's suspended round may accept fewer: the labels decide the outputs, this only
        # when the round closes (so, like a gate's threshold, it is not a dependency)
        given = os.environ.get(ACCEPT_ENV, "")
        accept = int(given) if given.isdigit() else 0  # anything but a positive count is no answer
        wanted = min(accept, config.wanted or accept) or config.wanted
        return HumanLabeler(labels_file, wanted, config.seed, limits, config.overlap)
    return FileLabeler(labels_file, limits)


def sample_replies(
    policy: Any, tokenizer: Any, prompts: list[str], config: ComparisonsConfig, seed: int
) -> dict[str, list[tuple[str, float]]]:
    """`replies_per_prompt` (reply, temperature) per prompt, the temperatures taking turns."""
    out: dict[str, list[tuple[str, float]]] = {p: [] for p in prompts}
    n = len(config.temperatures)
    for i, temperature in enumerate(config.temperatures):
        k = config.replies_per_prompt // n + (i < config.replies_per_prompt % n)
        batch = [p for p in prompts for _ in range(k)]
        generation = generate(policy, tokenizer, batch, config.max_new_tokens, temperature, seed=seed + i)
        for p, r in zip(batch, generation.replies, strict=True):
            out[p].append((r, temperature))
    return out


def make_pairs(
    replies: dict[str, list[tuple[str, float]]], n: int, split: str, round_: int, rng: random.Random
) -> list[Pair]:
    """Up to `n` pairs of distinct non-empty replies, the prompts taking turns so every prompt gets its share."""
    candidates = []
    for prompt, rs in replies.items():
        distinct = list({r: t for r, t in rs if r}.items())
        combos = list(itertools.combinations(distinct, 2))
        rng.shuffle(combos)
        candidates.append([(prompt, a, b) for a, b in combos])
    pairs: list[Pair] = []
    for turn in itertools.zip_longest(*candidates):
        for item in turn:
            if item is not None and len(pairs) < n:
                (prompt, (a, ta), (b, tb)) = item
                pairs.append(Pair(pair_id(prompt, a, b), prompt, a, b, round_, split, ta, tb))
    return pairs


def preferences(pairs: list[Pair], labels: dict[str, Label]) -> list[dict[str, str]]:
    """prompt/chosen/rejected rows from the pairs that have a label (by pair id); a tie teaches no preference and is
    left out."""
    rows = []
    for p in pairs:
        lab = labels.get(p.id)
        if lab is not None and lab.choice != "tie":
            chosen, rejected = (p.a, p.b) if lab.choice == "a" else (p.b, p.a)
            rows.append({"prompt": p.prompt, "chosen": chosen, "rejected": rejected})
    return rows


def gold_agreement(rows: list[dict[str, str]]) -> float | None:
    """How often the labels agree with the gold judge (gold ties count half): the ceiling a reward model can reach
    on these pairs. None off the default task."""
    if not rows or not gold.judge_applies([r["prompt"] for r in rows]):
        return None
    gaps = [gold.gold_score(r["prompt"], r["chosen"]) - gold.gold_score(r["prompt"], r["rejected"]) for r in rows]
    return agreement(gaps)


def run(
    config: ComparisonsConfig,
    data_dir: Path,
    policy_dir: Path,
    out_dir: Path,
    report_dir: Path,
    labeler: Labeler | None,
    tracker: Tracker,
    round_: int = 1,
) -> dict[str, Any]:
    """Sample, pair and label; write the files of the module docstring to `out_dir`. Returns metrics.json's content.
    The pairs are written to `report_dir` first (pairs.jsonl): a file labeler still waiting for labels stops with
    the pairs there to label."""
    rng = random.Random(f"{config.seed}-{round_}")
    tracker.log_params({"comparisons": asdict(config), "round": round_})
    train_prompts = sorted({r["prompt"] for r in read_jsonl(data_dir / "prompts.jsonl")})
    rng.shuffle(train_prompts)
    test_prompts = sorted({r["prompt"] for r in read_jsonl(data_dir / "sft_test.jsonl")})
    train: list[Pair] = []
    test: list[Pair] = []
    replies_test: dict[str, list[tuple[str, float]]] = {}
    if labeler is not None and config.train_pairs + config.test_pairs > 0:
        policy, tokenizer = load_causal_lm(policy_dir)
        # 1. sample: the policy's own replies, several per prompt and temperature
        replies_train = sample_replies(policy, tokenizer, train_prompts[: config.max_prompts], config, config.seed)
        replies_test = sample_replies(policy, tokenizer, test_prompts, config, config.seed + 1000)
        # 2. pair distinct replies of one prompt
        train = make_pairs(replies_train, config.train_pairs, "train", round_, rng)
        test = make_pairs(replies_test, config.test_pairs, "test", round_, rng)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(report_dir / "pairs.jsonl", [asdict(p) for p in train + test])
    if isinstance(labeler, HumanLabeler):
        labeler.prepare(train + test, report_dir)  # Label Studio's tasks and labelling config
    # 3. label (a file or human labeler stops here while pairs await labels, naming how many)
    labels = labeler.label(train + test) if labeler is not None and train + test else []
    given = {lab.id: lab for lab in labels}
    train_rows, test_rows = preferences(train, given), preferences(test, given)
    metrics = {
        "round": round_,
        "labeler": labeler.name if labeler is not None else "none",
        "train_prompts": min(len(train_prompts), config.max_prompts) if train else 0,
        "test_prompts": len(replies_test),
        "train_pairs": len(train),
        "test_pairs": len(test),
        "ties": sum(lab.choice == "tie" for lab in labels),
        "train_preferences": len(train_rows),
        "test_preferences": len(test_rows),
        "labeler_gold_agreement_train": gold_agreement(train_rows),
        "labeler_gold_agreement_test": gold_agreement(test_rows),  # the gate's on-policy ceiling
        "labelled_pairs": len(labels),
    }
    if isinstance(labeler, HumanLabeler) and labeler.round is not None:  # people: their agreement, where two labelled
        metrics |= {k: labeler.round.report[k] for k in HUMAN_METRICS}
        metrics["wanted"] = min(labeler.wanted or len(train + test), len(train + test))  # what closed the round
    with staged_dir(out_dir) as tmp:
        write_jsonl(tmp / "pairs.jsonl", [asdict(p) for p in train + test])
        write_jsonl(tmp / "labels.jsonl", [asdict(lab) for lab in labels])
        write_jsonl(tmp / "preferences.jsonl", train_rows)
        write_jsonl(tmp / "preferences_test.jsonl", test_rows)
        replies = [{"prompt": p, "replies": [r for r, _ in rs]} for p, rs in replies_test.items()]
        write_jsonl(tmp / "replies_test.jsonl", replies)
        write_json(tmp / "metrics.json", metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.comparisons", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data", help="validated datasets (their prompts)")
    parser.add_argument("--policy", default="artifacts/sft/model", help="the policy whose replies are compared")
    parser.add_argument("--labels", help="the labels file (labeler: file); `rlhf sync` passes it")
    parser.add_argument("--round", type=int, default=1, help="which round of comparisons (1: on the SFT policy)")
    parser.add_argument("--out", default="artifacts/comparisons")
    parser.add_argument("--reports", default="reports/comparisons", help="the pairs, also when they await labels")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(ComparisonsConfig, params.get("comparisons"))
    use_hardware(params)
    tau = config_from(TaskConfig, params.get("task")).labeler_tau  # the offline labels' noise: the same "humans"
    v = params.get("validate") or {}
    limits = Limits(v["max_rows"], v["max_file_bytes"], v["max_row_bytes"]) if v else Limits()
    labels_file = Path(args.labels) if args.labels else None
    labeler = None if config.labeler == "none" else labeler_for(config, tau, labels_file, limits)
    with mlflow_run("comparisons", tags={"rlhf.labeler": config.labeler, "rlhf.round": str(args.round)}) as tracker:
        metrics = run(
            config, Path(args.data), Path(args.policy), Path(args.out), Path(args.reports), labeler, tracker, args.round
        )
    ceiling = metrics["labeler_gold_agreement_test"]
    print(
        f"comparisons: {metrics['train_pairs']} training and {metrics['test_pairs']} test pairs of the policy's own "
        f"replies labelled by {metrics['labeler']}"
        + (f"; the labels agree with the gold judge {ceiling:.3f} on the test pairs" if ceiling is not None else "")
        + (
            f"; the annotators agree {metrics['annotator_agreement']:.3f} where two labelled one pair"
            if metrics.get("annotator_agreement") is not None
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("comparisons", main))

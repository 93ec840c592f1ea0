"""One preference set can feed the whole pipeline: the datasets the stages need, derived from it by prompt.

The stages read six datasets (`REQUIRED`). A user may give all six, or only `preferences` (and any others): the rest
are derived from the validated pairs, always split by prompt, so no held-out prompt reaches a training set:

    preferences_test   a seeded `heldout_fraction` of the distinct prompts (never a prompt of a given training set)
    judge_preferences  when the judge is a reward model: a seeded `judge.fraction` of the remaining training prompts,
                       whose pairs train the judge instead of the reward model (stages/lib/judge.py)
    sft, sft_test      the chosen replies of the training and held-out pairs (`sft_from_chosen`)
    prompts            the distinct training prompts (PPO's rollouts)
    eval_prompts       the held-out prompts of a seeded half of them (test); when it is derived, the other half
                       (dev) is what preferences_test and sft_test keep: the gate, the on-policy held-out pairs and
                       PPO's monitor choose on dev prompts, and the evaluation reports on prompts no choice was made on

A prompt's side is a pure function of (salt, seed, prompt text): adding rows never moves an existing prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from stages.lib.outcome import BadInput
from stages.lib.params import NON_NEGATIVE, OPEN_FRACTION

REQUIRED = ("sft", "sft_test", "preferences", "preferences_test", "prompts", "eval_prompts")
JUDGE = "judge_preferences"
TEST_FRACTION = 0.5  # of the held-out prompts: eval_prompts' share when it is derived (the rest: dev)


@dataclass(frozen=True)
class SplitConfig:
    """params.yaml: validate.split."""

    heldout_fraction: float  # of the distinct prompts, when no preferences_test is given
    seed: int
    sft_from_chosen: bool  # derive sft / sft_test from the chosen replies when they are not given

    SECTION: ClassVar[str] = "validate.split"
    RANGES: ClassVar[dict] = {"heldout_fraction": OPEN_FRACTION, "seed": NON_NEGATIVE}


def in_fraction(prompt: str, fraction: float, seed: int, salt: str) -> bool:
    """Whether `prompt` falls in the seeded `fraction` (a hash, not an RNG: stable whatever else the data holds)."""
    digest = hashlib.sha256(f"{salt}:{seed}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _split(
    frame: pd.DataFrame, fraction: float, seed: int, salt: str, keep: set[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows whose prompt stays, rows whose prompt falls in the fraction); prompts in `keep` always stay."""
    chosen = frame["prompt"].map(lambda p: p not in keep and in_fraction(p, fraction, seed, salt))
    return frame[~chosen].reset_index(drop=True), frame[chosen].reset_index(drop=True)


def _prompts(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["prompt"]].drop_duplicates().reset_index(drop=True)


def _demos(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.rename(columns={"chosen": "response"})[["prompt", "response"]].drop_duplicates().reset_index(drop=True)


def derive(
    frames: dict[str, pd.DataFrame], config: SplitConfig, judge_fraction: float | None = None, judge_seed: int = 1
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The six datasets (plus the judge's pairs when `judge_fraction` is set) from the validated ones given; returns
    (every dataset, {derived name: where it came from})."""
    out, notes = dict(frames), {}
    missing = [n for n in REQUIRED if n not in out]
    if not missing and judge_fraction is None:
        return out, notes
    if "preferences" not in out:
        raise BadInput(f"params.yaml data: {', '.join(missing)} missing and no preferences to derive them from")
    given_training = {p for n in ("sft", "prompts") if n in frames for p in frames[n]["prompt"]}
    if "preferences_test" not in out:
        out["preferences"], out["preferences_test"] = _split(
            frames["preferences"], config.heldout_fraction, config.seed, "heldout", given_training
        )
        notes["preferences_test"] = (
            f"{config.heldout_fraction:.0%} of the preference prompts (seed {config.seed}), split by prompt"
        )
    if "eval_prompts" not in frames:  # dev (the gates, the monitor) and test (the evaluation) by prompt
        dev, test = _split(out["preferences_test"], TEST_FRACTION, config.seed, "test", set())
        if "preferences_test" not in frames or not dev.empty:
            out["preferences_test"] = dev
        out["eval_prompts"] = _prompts(test)
        notes["eval_prompts"] = (
            f"the distinct prompts of {TEST_FRACTION:.0%} of preferences_test's (seed {config.seed}): the test half; "
            "preferences_test and sft_test keep the dev half"
        )
    if judge_fraction is not None:
        out["preferences"], out[JUDGE] = _split(out["preferences"], judge_fraction, judge_seed, "judge", set())
        notes[JUDGE] = (
            f"{judge_fraction:.0%} of the training prompts (seed {judge_seed}): the judge reward model's pairs"
        )
    if config.sft_from_chosen:
        for name, source in (("sft", "preferences"), ("sft_test", "preferences_test")):
            if name not in frames:
                pairs = out[source] if name == "sft_test" else pd.concat([out["preferences"], out.get(JUDGE)])
                out[name] = _demos(pairs)
                notes[name] = f"the chosen replies of {source}"
    if "prompts" not in frames:
        out["prompts"] = _prompts(out["preferences"])
        notes["prompts"] = "the distinct prompts of preferences"
    still = [n for n in REQUIRED if n not in out or out[n].empty]
    if still:
        raise BadInput(
            f"params.yaml data: {', '.join(still)} could not be derived (too few rows, or sft_from_chosen "
            "is off): give them, or more preference pairs"
        )
    return out, notes

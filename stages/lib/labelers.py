"""Who labels a comparison of two replies: the interface between the comparisons stage and a labelling round.

    simulated  the default task's labeler: P(a preferred) = sigmoid((gold_a - gold_b) / tau), the same noise
               (`task.labeler_tau`) as the offline pairs' labels, so the "humans" stay exactly as noisy as before
    endpoint   an LLM judge behind an OpenAI-compatible chat-completions URL, asked which reply is better (RLAIF)
    file       the labels a person returned in a file (one JSON object a line, schema below)
    human      people in Label Studio: tasks to import, its JSON export read back (stages/lib/label_studio.py)

The files (docs/comparisons.md):

    pairs to label   {"id", "prompt", "a", "b", "round", "split": "train" | "test", "temperature_a", "temperature_b"}
    labels returned  {"id", "choice": "a" | "b" | "tie", "annotator": a pseudonymous id, "time": ISO 8601 or null}

`id` is a digest of (prompt, a, b): the same pair has the same id in every run, so labels given once stay valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from stages.lib import gold
from stages.lib.formats import DataError, Limits, read_records
from stages.lib.outcome import BadInput

CHOICES = ("a", "b", "tie")
QUESTION = (
    "You are comparing two replies of an assistant in a conversation. Which reply is more helpful, correct, harmless "
    "and polite? Answer with one letter: A, B, or T if they are equally good.\n\nConversation:{prompt}\n\n"
    "Reply A: {a}\n\nReply B: {b}"
)


@dataclass(frozen=True)
class Pair:
    """Two distinct replies of the policy to one prompt, to be compared."""

    id: str
    prompt: str
    a: str
    b: str
    round: int
    split: str  # train | test
    temperature_a: float
    temperature_b: float


@dataclass(frozen=True)
class Label:
    id: str
    choice: str  # a | b | tie
    labeler: str
    annotator: str  # pseudonymous: never a name or an e-mail address
    time: str | None


def pair_id(prompt: str, a: str, b: str) -> str:
    return hashlib.sha1(json.dumps([prompt, a, b]).encode()).hexdigest()[:16]


def preference_probability(gold_a: float, gold_b: float, tau: float) -> float:
    """Bradley-Terry: P(a preferred over b) = sigmoid((g_a - g_b) / tau)."""
    return 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / tau))


def labeler_agreement(gold_diffs: list[float], tau: float) -> float:
    """Expected agreement of the simulated labeler with the gold judge over pairs with these gold gaps (ties count
    half)."""
    return sum(0.5 if d == 0 else preference_probability(abs(d), 0.0, tau) for d in gold_diffs) / len(gold_diffs)


def agreement(gaps: list[float]) -> float:
    """Realised agreement of labels with the gold judge, from each pair's gold gap (chosen - rejected): the chosen
    reply has the higher gold score (ties count half). The best accuracy a perfect reward model can reach on them."""
    return sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gaps) / len(gaps)


class Labeler(Protocol):
    name: str

    def label(self, pairs: Sequence[Pair]) -> list[Label]: ...


class SimulatedLabeler:
    """The default task's rater: a Bradley-Terry draw on the gold scores (a tie of the gold scores is a coin flip)."""

    def __init__(self, tau: float, seed: int) -> None:
        self.tau, self.seed, self.name = tau, seed, "simulated"

    def label(self, pairs: Sequence[Pair]) -> list[Label]:
        if not gold.judge_applies([p.prompt for p in pairs]):
            raise BadInput(
                "comparisons.labeler simulated labels only the default task's prompts (it needs the gold judge): "
                "choose endpoint or file for your own data"
            )
        out = []
        for p in pairs:
            rng = random.Random(f"{self.seed}-{p.id}")  # one draw per pair, whatever else is labelled
            prefer_a = rng.random() < preference_probability(
                gold.gold_score(p.prompt, p.a), gold.gold_score(p.prompt, p.b), self.tau
            )
            out.append(Label(p.id, "a" if prefer_a else "b", self.name, "simulated", None))
        return out


class EndpointLabeler:
    """An LLM behind an OpenAI-compatible chat-completions endpoint, asked which of two replies is better."""

    def __init__(self, url: str, model: str, timeout: float) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self.name = f"endpoint:{model or url}"

    def label(self, pairs: Sequence[Pair]) -> list[Label]:
        return [self._label(p) for p in pairs]

    def _label(self, p: Pair) -> Label:
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION.format(prompt=p.prompt, a=p.a, b=p.b)}],
        }
        request = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (the user's URL)
                answer = str(json.loads(response.read())["choices"][0]["message"]["content"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise BadInput(f"the labeler endpoint {self.url} gave no usable answer: {e}") from None
        found = re.search(r"\b([ABT])\b", answer.strip().upper())
        if found is None:
            raise BadInput(f"the labeler endpoint {self.url} answered {answer[:80]!r}, not A, B or T")
        choice = {"A": "a", "B": "b", "T": "tie"}[found.group(1)]
        return Label(p.id, choice, self.name, self.name, datetime.now(UTC).isoformat(timespec="seconds"))


class FileLabeler:
    """The labels a person returned: `labels` (one JSON object a line, schema in the module docstring). Every pair
    must have a label; a label for no pair is ignored (an earlier round's)."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path, self.limits, self.name = path, limits, "file"

    def label(self, pairs: Sequence[Pair]) -> list[Label]:
        given = self.read()
        missing = [p.id for p in pairs if p.id not in given]
        if missing:
            raise LabelsMissing(
                f"{len(missing)} of {len(pairs)} pairs have no label in {self.path} (first: {missing[0]}): label "
                "them (the pairs to label are in the stage's pairs.jsonl) and rerun"
            )
        return [given[p.id] for p in pairs]

    def read(self) -> dict[str, Label]:
        if not self.path.exists():
            return {}
        labels: dict[str, Label] = {}
        try:
            records = read_records(self.path, self.limits)
        except DataError as e:
            raise BadInput(f"labels file {self.path}: {e}") from None
        for i, row in enumerate(records, 1):
            if not isinstance(row, dict) or row.get("choice") not in CHOICES or not isinstance(row.get("id"), str):
                raise BadInput(f"{self.path} line {i}: expected {{'id': str, 'choice': 'a' | 'b' | 'tie', ...}}")
            annotator = str(row.get("annotator") or "anonymous")
            if "@" in annotator:
                raise BadInput(
                    f"{self.path} line {i}: annotator {annotator!r} looks like an e-mail address: use a pseudonym"
                )
            labels[row["id"]] = Label(row["id"], row["choice"], "file", annotator, row.get("time"))
        return labels


class LabelsMissing(BadInput):
    """Some pairs await a person's labels: nothing is wrong, the round is not finished (exit 65 names what to do)."""

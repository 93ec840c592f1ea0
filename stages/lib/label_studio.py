"""A labelling round in Label Studio's formats: the tasks to import, a pairwise-comparison labelling config, and the
export of annotations mapped back to one label per pair, with a line in the round's report for every problem.

Label Studio (labelstud.io, 1.23) shows a pair as one task: the conversation, then the two replies as "Reply A" and
"Reply B" in an order drawn per pair (seeded by the round and the pair's id) and recorded in the task (`order` "ab":
the pair's a is shown first), and four choices: A, B, Tie, Both bad (both count as a tie: no preference). Its JSON
export (Export -> JSON, or the API's /api/projects/<id>/export) lists every task with its annotations; `read_export`
maps each annotation back to the pair's a or b, with a pseudonymous annotator id (`ls-<user id>`: never a name or an
e-mail address) and its time. `close_round` makes one label per pair (the majority of its annotators; a split vote
teaches nothing and is left out) and the round's report: how many pairs are labelled, the annotators' agreement where
two or more labelled one pair (the ceiling a reward model can reach on these labels), the annotators who disagree with
the others far more than the rest do, and every problem (a skipped task, a deleted task, a pair labelled twice
differently, an annotation with no choice), each on one line.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.lib.formats import DataError, Limits, read_records
from stages.lib.io import write_json, write_jsonl
from stages.lib.labelers import Label, LabelsMissing, Pair
from stages.lib.outcome import BadInput

LABEL_CONFIG = """<View>
  <Header value="Which reply is better: more helpful, correct, harmless and polite?"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Reply A"/>
  <Text name="first" value="$first"/>
  <Header value="Reply B"/>
  <Text name="second" value="$second"/>
  <Choices name="choice" toName="prompt" choice="single-radio" required="true" showInline="true">
    <Choice value="A" hotkey="1"/>
    <Choice value="B" hotkey="2"/>
    <Choice value="Tie" hotkey="3"/>
    <Choice value="Both bad" hotkey="4"/>
  </Choices>
</View>
"""
SHOWN = {"A": 0, "B": 1}  # the choice's position on screen; Tie and Both bad prefer neither
NO_PREFERENCE = ("Tie", "Both bad")
ACCEPT_ENV = "RLHF_LABELS_ACCEPT"  # a person's answer to a suspended round: close it with this many labelled pairs
AWAITING = "comparisons labelled"  # in the reason while a round awaits labels (flows/labelling.py looks for it)
OUTLIER_MARGIN = 0.25  # an annotator this much further from the others' majority than the median annotator is listed
OUTLIER_MIN_LABELS = 5  # ... once they have at least this many labels on pairs others labelled too


@dataclass(frozen=True)
class Annotation:
    """One person's answer on one pair, mapped back from what they saw."""

    pair: str  # the pair's id
    choice: str  # a | b | tie
    annotator: str  # ls-<Label Studio user id>
    time: str | None
    clicked: str  # A | B | Tie | Both bad
    task: int | None  # Label Studio's task id


@dataclass
class Round:
    """One label per labelled pair, the annotations behind them, and the report's numbers and problem lines."""

    labels: dict[str, Label]
    annotations: list[Annotation]
    report: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def order(pair: Pair, seed: int) -> str:
    """Which reply is shown first: "ab" (the pair's a) or "ba", drawn once per pair and round."""
    return "ab" if random.Random(f"{seed}-{pair.round}-{pair.id}").random() < 0.5 else "ba"


def _shown(text: str) -> str:
    """Text as a task shows it: a NUL (which a sampled reply can hold) as U+FFFD, since PostgreSQL, Label Studio's
    database, refuses NUL in text ("unsupported Unicode escape sequence"). Labels map back by the pair's id, never
    by this text, so the pair's own replies are what the reward model trains on."""
    return text.replace("\x00", "\ufffd")


def tasks(pairs: Sequence[Pair], seed: int) -> list[dict[str, Any]]:
    """Label Studio tasks (its import format) for `pairs`, each reply order drawn and recorded."""
    out = []
    for p in pairs:
        shown = order(p, seed)
        first, second = (p.a, p.b) if shown == "ab" else (p.b, p.a)
        data = {
            "pair": p.id,
            "prompt": _shown(p.prompt),
            "first": _shown(first),
            "second": _shown(second),
            "order": shown,
        }
        out.append({"data": data | {"round": p.round, "split": p.split}})
    return out


def _annotator(completed_by: Any) -> str:
    """`ls-<id>`: Label Studio's user id, which names nobody outside it (the export may carry the e-mail: dropped)."""
    user = completed_by.get("id") if isinstance(completed_by, dict) else completed_by
    return f"ls-{user}" if isinstance(user, int) and not isinstance(user, bool) else "ls-unknown"


def _clicked(result: Any) -> str | None:
    """The choice an annotation's result holds (our config's `choice` control), or None."""
    for item in result if isinstance(result, list) else []:
        value = item.get("value") if isinstance(item, dict) else None
        choices = value.get("choices") if isinstance(value, dict) else None
        if (
            isinstance(item, dict)
            and item.get("from_name") == "choice"
            and isinstance(choices, list)
            and len(choices) == 1
        ):
            return str(choices[0])
    return None


def read_export(path: Path, limits: Limits) -> tuple[list[Annotation], dict[str, int], list[str]]:
    """Every usable annotation in a Label Studio JSON export, the pairs that have a task (pair id -> task id), and one
    line per annotation or task that could not be used."""
    try:
        records = read_records(path, limits)
    except DataError as e:
        raise BadInput(f"Label Studio export {path}: {e}") from None
    annotations: list[Annotation] = []
    has_task: dict[str, int] = {}
    problems: list[str] = []
    for i, task in enumerate(records, 1):
        data = task.get("data") if isinstance(task, dict) else None
        name = f"{path} task {task.get('id', f'#{i}') if isinstance(task, dict) else f'#{i}'}"
        if not isinstance(data, dict) or not isinstance(data.get("pair"), str) or data.get("order") not in ("ab", "ba"):
            problems.append(f"{name}: not a comparison of this stage (no data.pair and data.order): ignored")
            continue
        pair, shown = data["pair"], data["order"]
        has_task.setdefault(pair, task.get("id"))
        found = task.get("annotations")
        for n, a in enumerate(found if isinstance(found, list) else [], 1):
            if not isinstance(a, dict):
                problems.append(f"{name} (pair {pair}) annotation {n}: not an object: ignored")
                continue
            who = _annotator(a.get("completed_by"))
            if a.get("was_cancelled"):
                problems.append(f"{name} (pair {pair}): skipped by {who}: no label")
                continue
            clicked = _clicked(a.get("result"))
            if clicked not in (*SHOWN, *NO_PREFERENCE):
                said = "no choice" if clicked is None else f"the unknown choice {clicked!r}"
                problems.append(f"{name} (pair {pair}) annotation {n} by {who}: {said}: ignored")
                continue
            choice = "tie" if clicked in NO_PREFERENCE else shown[SHOWN[clicked]]
            time = a.get("updated_at") or a.get("created_at")
            annotations.append(Annotation(pair, choice, who, str(time) if time else None, clicked, task.get("id")))
    return annotations, has_task, problems


def pairwise_agreement(votes: Sequence[dict[str, str]]) -> tuple[float | None, int]:
    """The share of annotator couples on one pair who gave the same choice, over every pair labelled by two or
    more (ties agree with ties), and how many couples that is."""
    couples = [a == b for v in votes for a, b in itertools.combinations(v.values(), 2)]
    return (sum(couples) / len(couples) if couples else None), len(couples)


def majority(vote: dict[str, str]) -> str | None:
    """The choice most annotators of a pair gave; None when the top choices are level (a split vote)."""
    ranked = Counter(vote.values()).most_common()
    return ranked[0][0] if len(ranked) == 1 or ranked[0][1] > ranked[1][1] else None


def annotator_table(votes: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per annotator: labels given, and how often they differ from the majority of the pair's other annotators
    (on pairs where the others agree among themselves)."""
    table: dict[str, dict[str, Any]] = defaultdict(lambda: {"labels": 0, "compared": 0, "disagreed": 0})
    for vote in votes.values():
        for who, choice in vote.items():
            row = table[who]
            row["labels"] += 1
            others = majority({k: v for k, v in vote.items() if k != who}) if len(vote) > 1 else None
            if others is not None:
                row["compared"] += 1
                row["disagreed"] += choice != others
    for row in table.values():
        row["disagreement"] = row["disagreed"] / row["compared"] if row["compared"] else None
    return dict(sorted(table.items()))


def outliers(table: dict[str, dict[str, Any]]) -> list[str]:
    """Annotators who disagree with the others' majority far more than the median annotator does."""
    rates = [r["disagreement"] for r in table.values() if r["compared"] >= OUTLIER_MIN_LABELS]
    if len(rates) < 3:  # with two annotators each is as far from the other: nobody stands out
        return []
    median = statistics.median(rates)
    return [
        who
        for who, r in table.items()
        if r["compared"] >= OUTLIER_MIN_LABELS and r["disagreement"] > median + OUTLIER_MARGIN
    ]


def close_round(pairs: Sequence[Pair], annotations: list[Annotation], has_task: dict[str, int], problems: list[str]):
    """One label per pair from its annotations (each annotator's latest; the majority across annotators), and the
    round's report."""
    ours = {p.id: p for p in pairs}
    problems = list(problems)
    by_pair: dict[str, dict[str, list[Annotation]]] = defaultdict(lambda: defaultdict(list))
    for a in annotations:
        if a.pair in ours:
            by_pair[a.pair][a.annotator].append(a)
    for pair, task in has_task.items():
        if pair not in ours:
            problems.append(f"task {task}: pair {pair} is not in this round (an earlier round's?): ignored")
    votes: dict[str, dict[str, str]] = {}
    latest: dict[str, dict[str, Annotation]] = {}
    for pair, per in by_pair.items():
        latest[pair] = {}
        for who, given in per.items():
            given = sorted(given, key=lambda a: a.time or "")
            if len({a.choice for a in given}) > 1:
                said = ", then ".join(a.clicked for a in given)
                problems.append(
                    f"pair {pair}: {who} labelled it {len(given)} times differently ({said}): the last counts"
                )
            latest[pair][who] = given[-1]
        votes[pair] = {who: a.choice for who, a in latest[pair].items()}
    labels: dict[str, Label] = {}
    for pair, vote in votes.items():
        choice = majority(vote)
        if choice is None:
            said = ", ".join(f"{who}: {c}" for who, c in sorted(vote.items()))
            problems.append(f"pair {pair}: its annotators are split ({said}): left out")
            continue
        time = max((a.time for a in latest[pair].values() if a.time), default=None)
        labels[pair] = Label(pair, choice, "human", ",".join(sorted(vote)), time)
    missing = [p.id for p in pairs if p.id not in has_task]
    if missing:
        problems.append(
            f"{len(missing)} pairs have no task in the export (deleted in Label Studio?): not labelled "
            f"(first: {missing[0]})"
        )
    test_votes = [v for pair, v in votes.items() if ours[pair].split == "test"]
    agree, couples = pairwise_agreement(list(votes.values()))
    agree_test, couples_test = pairwise_agreement(test_votes)
    table = annotator_table(votes)
    report = {
        "pairs": len(pairs),
        "labelled": len(labels),
        "ties": sum(lab.choice == "tie" for lab in labels.values()),
        "split_votes": sum(majority(v) is None for v in votes.values()),
        "annotations": sum(len(v) for v in votes.values()),
        "annotators": len(table),
        "pairs_labelled_twice_or_more": sum(len(v) > 1 for v in votes.values()),
        "annotator_agreement": agree,
        "annotator_couples": couples,
        "annotator_agreement_test": agree_test,
        "annotator_couples_test": couples_test,
        "per_annotator": table,
        "outliers": outliers(table),
        "problems": len(problems),
    }
    return Round(labels, [a for per in latest.values() for a in per.values()], report, problems)


def report_markdown(r: Round) -> str:
    """The round's report for people: counts, agreement, annotators, every problem on its own line."""
    rep = r.report
    agree = rep["annotator_agreement"]
    lines = [
        "# Labelling round",
        "",
        f"- {rep['labelled']} of {rep['pairs']} pairs labelled ({rep['ties']} ties, {rep['split_votes']} split votes "
        f"left out), {rep['annotations']} annotations by {rep['annotators']} annotators",
        f"- annotators' agreement: {agree:.3f} over {rep['annotator_couples']} couples on "
        f"{rep['pairs_labelled_twice_or_more']} pairs labelled twice or more"
        if agree is not None
        else "- annotators' agreement: no pair was labelled by two annotators",
        f"- far from the others' majority: {', '.join(rep['outliers'])}" if rep["outliers"] else "- no outlier",
        "",
        "| annotator | labels | compared | disagreed with the others |",
        "|---|---|---|---|",
        *(
            f"| {who} | {t['labels']} | {t['compared']} | "
            + (f"{t['disagreement']:.2f} |" if t["disagreement"] is not None else "- |")
            for who, t in rep["per_annotator"].items()
        ),
        "",
        "## Problems" if r.problems else "No problem.",
        *(f"- {line}" for line in r.problems),
    ]
    return "\n".join(lines) + "\n"


def annotation_rows(r: Round) -> list[dict[str, Any]]:
    return [asdict(a) for a in sorted(r.annotations, key=lambda a: (a.pair, a.annotator))]


class HumanLabeler:
    """People, in Label Studio: `prepare` writes the round's tasks and labelling config for import; `label` reads the
    project's JSON export (`export`), writes the round's report, and closes the round once `wanted` pairs (0: every
    pair) are answered by `overlap` annotators each, else stops naming how many are in (LabelsMissing: the round
    stays open). The labels are then the majority of each pair's answers (a split vote or a tie teaches nothing)."""

    def __init__(self, export: Path, wanted: int, seed: int, limits: Limits, overlap: int = 1) -> None:
        self.export, self.wanted, self.seed, self.limits, self.name = export, wanted, seed, limits, "human"
        self.overlap = overlap  # annotators asked per pair: a pair is done once this many answered it
        self.report_dir: Path | None = None
        self.round: Round | None = None

    def prepare(self, pairs: Sequence[Pair], report_dir: Path) -> None:
        self.report_dir = report_dir
        write_json(report_dir / "tasks.json", tasks(pairs, self.seed))
        (report_dir / "label_config.xml").write_text(LABEL_CONFIG, encoding="utf-8")

    def label(self, pairs: Sequence[Pair]) -> list[Label]:
        wanted = min(self.wanted or len(pairs), len(pairs))
        where = f"{self.report_dir}/" if self.report_dir else ""
        given = read_export(self.export, self.limits) if self.export.exists() else None
        if not given or not given[1]:  # no export, or an empty one (`rlhf run` makes one): the round is not open
            said = f"{self.export} holds no task yet" if given else f"no Label Studio export at {self.export} yet"
            raise LabelsMissing(
                f"0 of {wanted} {AWAITING}: {said}: import {where}tasks.json into a project labelled with "
                f"{where}label_config.xml, label, export it as JSON to {self.export} and rerun"
            )
        annotations, has_task, problems = given
        self.round = close_round(pairs, annotations, has_task, problems)
        if self.report_dir is not None:
            write_json(self.report_dir / "round.json", self.round.report | {"problem_lines": self.round.problems})
            (self.report_dir / "round.md").write_text(report_markdown(self.round), encoding="utf-8")
            write_jsonl(self.report_dir / "annotations.jsonl", annotation_rows(self.round))
        done = sum(n >= self.overlap for n in Counter(a.pair for a in self.round.annotations).values())
        if done < wanted:
            raise LabelsMissing(
                f"{done} of {wanted} {AWAITING} in {self.export} "
                f"({self.round.report['problems']} problems: {where}round.md): label more, export again and rerun"
            )
        return [self.round.labels[p.id] for p in pairs if p.id in self.round.labels]

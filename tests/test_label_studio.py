"""A labelling round in Label Studio's formats (stages/lib/label_studio.py): tasks in a recorded random order, the JSON
export mapped back to one label per pair, the annotators' agreement, and a line for every malformed or partial
annotation. The exports here have the shape Label Studio 1.23 writes (Export -> JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.comparisons import preferences
from stages.lib.formats import Limits
from stages.lib.label_studio import HumanLabeler, close_round, read_export, tasks
from stages.lib.labelers import LabelsMissing, Pair, pair_id
from stages.lib.outcome import BadInput
from stages.reward_gate import labels_ceiling

PROMPT = "\n\nHuman: What is the capital of Peru?\n\nAssistant:"


def _pairs(n: int, split: str = "train") -> list[Pair]:
    out = []
    for i in range(n):
        a, b = f"reply a{i} {split}", f"reply b{i} {split}"
        out.append(Pair(pair_id(PROMPT, a, b), PROMPT, a, b, 1, split, 0.7, 1.0))
    return out


def _annotation(user: int | dict, clicked: str | None, time: str = "2026-12-04T10:00:00Z", **extra) -> dict:
    result = (
        []
        if clicked is None
        else [
            {"id": "x1", "from_name": "choice", "to_name": "prompt", "type": "choices", "value": {"choices": [clicked]}}
        ]
    )
    return {
        "id": 1,
        "completed_by": user,
        "result": result,
        "was_cancelled": False,
        "created_at": time,
        "updated_at": time,
        "lead_time": 3.5,
        **extra,
    }


def _export(path: Path, made: list[dict], clicks: dict[int, list[dict]]) -> Path:
    """Label Studio's JSON export of the imported tasks `made`, task i carrying the annotations clicks[i]."""
    rows = [
        {
            "id": i + 1,
            "data": t["data"],
            "annotations": clicks.get(i, []),
            "predictions": [],
            "created_at": "2026-12-04T09:00:00Z",
            "project": 3,
        }
        for i, t in enumerate(made)
    ]
    path.write_text(json.dumps(rows))
    return path


def _click_for(task: dict, side: str) -> str:
    """What a person who prefers the pair's `side` (a or b) clicks, given the order the task shows them."""
    return "A" if task["data"]["order"][0] == side else "B"


def test_each_pair_is_shown_in_a_recorded_random_order_and_a_click_maps_back_to_its_reply(tmp_path):
    pairs = _pairs(40)
    made = tasks(pairs, seed=0)
    assert {t["data"]["order"] for t in made} == {"ab", "ba"}  # both orders are shown
    assert made == tasks(pairs, seed=0) and made != tasks(pairs, seed=1)  # drawn per pair and seed, reproducibly
    for t, p in zip(made, pairs, strict=True):
        shown = (t["data"]["first"], t["data"]["second"])
        assert shown == ((p.a, p.b) if t["data"]["order"] == "ab" else (p.b, p.a)) and t["data"]["pair"] == p.id
    export = _export(tmp_path / "export.json", made, {i: [_annotation(7, "A")] for i in range(40)})  # always the first
    r = close_round(pairs, *read_export(export, Limits()))
    rows = preferences(pairs, r.labels)
    first = {t["data"]["pair"]: t["data"]["first"] for t in made}
    assert len(rows) == 40 and all(row["chosen"] == first[p.id] for row, p in zip(rows, pairs, strict=True))
    assert r.problems == [] and r.report["annotator_agreement"] is None and r.report["annotators"] == 1
    # a sampled reply may hold NUL, which PostgreSQL (Label Studio's database) refuses: shown as U+FFFD, and the
    # label still maps back to the pair's own reply by its id
    odd = Pair(pair_id(PROMPT, "a\x00b", "c"), PROMPT, "a\x00b", "c", 1, "train", 0.7, 1.0)
    (task,) = tasks([odd], seed=0)
    assert "\x00" not in json.dumps(task) and "a\ufffdb" in (task["data"]["first"], task["data"]["second"])
    export = _export(tmp_path / "odd.json", [task], {0: [_annotation(7, _click_for(task, "a"))]})
    assert preferences([odd], close_round([odd], *read_export(export, Limits())).labels)[0]["chosen"] == "a\x00b"


def test_two_people_on_one_pair_give_the_agreement_and_a_far_annotator_is_listed(tmp_path):
    pairs = _pairs(10) + _pairs(10, "test")
    made = tasks(pairs, seed=0)
    choices = {}  # per task: what ls-1 .. ls-4 prefer; the truth is "a"
    for i in range(20):
        choices[i] = ["a", "b" if i % 4 == 0 else "a", "a" if i % 5 == 0 else "b", "a"]  # ls-3 errs on 16 of 20
    clicks = {i: [_annotation(u + 1, _click_for(made[i], c)) for u, c in enumerate(cs)] for i, cs in choices.items()}
    r = close_round(pairs, *read_export(_export(tmp_path / "e.json", made, clicks), Limits()))
    rep = r.report
    assert rep["annotators"] == 4 and rep["annotations"] == 80 and rep["pairs_labelled_twice_or_more"] == 20
    agree = sum(cs[u] == cs[v] for cs in choices.values() for u in range(4) for v in range(u + 1, 4))
    assert rep["annotator_couples"] == 120 and rep["annotator_agreement"] == pytest.approx(agree / 120)
    agree_test = sum(cs[u] == cs[v] for i, cs in choices.items() if i >= 10 for u in range(4) for v in range(u + 1, 4))
    assert rep["annotator_couples_test"] == 60 and rep["annotator_agreement_test"] == pytest.approx(agree_test / 60)
    assert rep["per_annotator"]["ls-3"]["disagreement"] == pytest.approx(16 / 20)
    assert rep["outliers"] == ["ls-3"]  # ls-2, wrong on 5 of 20, is not
    split = {i for i, cs in choices.items() if cs.count("b") == 2}  # 2 against 2: left out
    assert split and rep["split_votes"] == len(split)
    assert {p: lab.choice for p, lab in r.labels.items()} == {p.id: "a" for i, p in enumerate(pairs) if i not in split}
    assert labels_ceiling({"labeler_gold_agreement_test": None, "annotator_agreement_test": 0.7}) == 0.7
    assert labels_ceiling({"labeler_gold_agreement_test": 0.62, "annotator_agreement_test": 0.7}) == 0.62


def test_malformed_and_partial_annotations_each_get_a_line_never_a_traceback(tmp_path):
    pairs = _pairs(9)
    made = tasks(pairs, seed=0)
    clicks = {
        0: [_annotation(1, "A"), _annotation(1, "A", was_cancelled=True)],  # one skipped, by another task copy below
        1: [_annotation(1, None, was_cancelled=True)],  # skipped
        2: [_annotation(1, "Tie")],
        3: [_annotation({"id": 2, "email": "jane@example.com", "first_name": "Jane"}, "Both bad")],
        4: [_annotation(1, "A", "2026-12-04T10:00:00Z"), _annotation(1, "B", "2026-12-04T11:00:00Z")],  # twice
        5: [_annotation(1, "A"), _annotation(2, "B")],  # split
        6: [_annotation(1, None), _annotation(2, "Maybe")],  # no choice; an unknown one
        # 7: labelled by nobody yet; 8: deleted in Label Studio (below)
    }
    foreign = {"id": 99, "data": {"text": "someone else's task"}, "annotations": [_annotation(1, "A")]}
    earlier = tasks(_pairs(1, "earlier"), seed=0)[0] | {"id": 98, "annotations": [_annotation(1, "A")]}
    export = _export(tmp_path / "export.json", made[:8], clicks)
    rows = json.loads(export.read_text()) + [foreign, earlier]
    export.write_text(json.dumps(rows))
    r = close_round(pairs, *read_export(export, Limits()))
    said = "\n".join(r.problems)
    assert f"task 2 (pair {pairs[1].id}): skipped by ls-1: no label" in said
    assert f"pair {pairs[4].id}: ls-1 labelled it 2 times differently" in said and "the last counts" in said
    assert f"pair {pairs[5].id}: its annotators are split (ls-1: " in said and "left out" in said
    assert "annotation 1 by ls-1: no choice: ignored" in said and "the unknown choice 'Maybe'" in said
    assert "task 99: not a comparison of this stage" in said
    assert "task 98: pair" in said and "is not in this round" in said
    assert f"1 pairs have no task in the export (deleted in Label Studio?): not labelled (first: {pairs[8].id})" in said
    assert len(r.problems) == 9 and r.report["problems"] == 9
    labels = {p: lab.choice for p, lab in r.labels.items()}
    assert labels == {
        pairs[0].id: made[0]["data"]["order"][0],
        pairs[2].id: "tie",
        pairs[3].id: "tie",  # both bad: no preference
        pairs[4].id: made[4]["data"]["order"][1],  # the later click, B
    }
    assert r.report["ties"] == 2 and r.report["split_votes"] == 1 and r.report["labelled"] == 4
    assert "jane" not in json.dumps([vars(a) for a in r.annotations]).lower()  # pseudonymous: ls-2 only


def test_an_unreadable_export_is_one_clear_line(tmp_path):
    bad = tmp_path / "export.json"
    bad.write_text('[{"id": 1, "data": ')
    with pytest.raises(BadInput, match=f"Label Studio export {bad}"):
        read_export(bad, Limits())
    bad.write_bytes(b"\xff\xfe[]")
    with pytest.raises(BadInput, match=f"Label Studio export {bad}"):
        read_export(bad, Limits())
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"id": i, "data": {}} for i in range(2000)]))
    with pytest.raises(BadInput, match=f"Label Studio export {big}"):
        read_export(big, Limits(max_file_bytes=1000))


def test_the_human_labeler_waits_for_enough_labels_then_closes_the_round(tmp_path):
    pairs = _pairs(6)
    export = tmp_path / "labels" / "round-1.json"
    labeler = HumanLabeler(export, wanted=4, seed=0, limits=Limits())
    labeler.prepare(pairs, tmp_path / "reports")
    made = json.loads((tmp_path / "reports/tasks.json").read_text())
    assert [t["data"]["pair"] for t in made] == [p.id for p in pairs]
    assert '<Choices name="choice" toName="prompt"' in (tmp_path / "reports/label_config.xml").read_text()
    with pytest.raises(LabelsMissing, match=f"0 of 4 comparisons labelled: no Label Studio export at {export}"):
        labeler.label(pairs)
    export.parent.mkdir()
    export.write_text("[]\n")  # what `rlhf run` leaves where no labels were given yet
    with pytest.raises(LabelsMissing, match="holds no task yet: import .*tasks.json"):
        labeler.label(pairs)
    _export(export, made, {i: [_annotation(1, "A")] for i in range(3)})
    with pytest.raises(LabelsMissing, match="3 of 4 comparisons labelled"):
        labeler.label(pairs)
    assert "- 3 of 6 pairs labelled" in (tmp_path / "reports/round.md").read_text()  # the report shows progress
    _export(export, made, {i: [_annotation(1, "A"), _annotation(2, "A")] for i in range(4)})
    got = labeler.label(pairs)
    assert [g.id for g in got] == [p.id for p in pairs[:4]] and {g.annotator for g in got} == {"ls-1,ls-2"}
    report = json.loads((tmp_path / "reports/round.json").read_text())
    assert report["annotator_agreement"] == 1.0 and report["labelled"] == 4
    assert len((tmp_path / "reports/annotations.jsonl").read_text().splitlines()) == 8

"""The comparisons stage and its labelers: pairs of the policy's own replies, labelled by the simulated labeler, an
LLM behind a local OpenAI-compatible HTTP server (started here), or a person's labels file."""

from __future__ import annotations

import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from flows import sync
from stages.comparisons import make_pairs, preferences
from stages.lib import gold
from stages.lib.formats import Limits
from stages.lib.label_studio import ACCEPT_ENV
from stages.lib.labelers import (
    EndpointLabeler,
    FileLabeler,
    Label,
    LabelsMissing,
    Pair,
    SimulatedLabeler,
    pair_id,
    preference_probability,
)
from stages.lib.outcome import BadInput, ExitCode
from tests.helpers import BIN, make_project, run

TASK_PROMPT = "\n\nHuman: What is the capital of Peru?\n\nAssistant:"


def _pair(a: str, b: str, prompt: str = TASK_PROMPT) -> Pair:
    return Pair(pair_id(prompt, a, b), prompt, a, b, 1, "train", 0.7, 1.0)


def test_pairs_are_distinct_replies_of_one_prompt_and_every_prompt_gets_its_turn():
    replies = {
        "p1": [("x", 0.7), ("y", 0.7), ("x", 1.0), ("z", 1.0)],  # "x" twice: one reply, not a pair with itself
        "p2": [("u", 0.7), ("", 1.0), ("v", 1.0)],  # an empty reply is never compared
        "p3": [("same", 0.7), ("same", 1.0)],  # no distinct pair at all
    }
    pairs = make_pairs(replies, 4, "train", 1, random.Random(0))
    assert [p.prompt for p in pairs[:2]] == ["p1", "p2"] and len(pairs) == 4
    assert all(p.a != p.b and p.a and p.b for p in pairs)
    assert {(p.a, p.b) for p in pairs if p.prompt == "p2"} <= {("u", "v"), ("v", "u")}
    assert len({p.id for p in pairs}) == 4 and pairs[0].id == pair_id(pairs[0].prompt, pairs[0].a, pairs[0].b)


def test_a_tie_teaches_no_preference():
    pairs = [_pair("a1", "b1"), _pair("a2", "b2"), _pair("a3", "b3")]
    labels = {p.id: Label(p.id, c, "file", "r1", None) for p, c in zip(pairs, ("a", "b", "tie"), strict=True)}
    assert preferences([*pairs, _pair("a4", "b4")], labels) == [  # a pair with no label (yet) teaches nothing either
        {"prompt": TASK_PROMPT, "chosen": "a1", "rejected": "b1"},
        {"prompt": TASK_PROMPT, "chosen": "b2", "rejected": "a2"},
    ]


def test_the_simulated_labeler_is_the_offline_labels_bradley_terry_rater():
    good, bad = "The capital of Peru is Lima.", "Ugh. The capital of Peru is Quito"
    pairs = [_pair(good, bad)]
    labeler = SimulatedLabeler(tau=1.75, seed=0)
    assert labeler.label(pairs) == labeler.label(pairs)  # one seeded draw per pair id
    p_good = preference_probability(gold.gold_score(TASK_PROMPT, good), gold.gold_score(TASK_PROMPT, bad), 1.75)
    many = [_pair(good, bad + " " * i) for i in range(1, 401)]  # one gold gap (it strips), 400 ids: 400 draws
    share = sum(lab.choice == "a" for lab in SimulatedLabeler(1.75, 3).label(many)) / len(many)
    assert abs(share - p_good) < 0.06 and p_good > 0.8
    with pytest.raises(BadInput, match="labels only the default task's prompts"):
        labeler.label([_pair("x", "y", "\n\nHuman: Write me a haiku.\n\nAssistant:")])


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint: answers A when reply A is shorter, B otherwise, T on a tie."""

    answers: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        a = text.split("Reply A: ")[1].split("\n\nReply B: ")[0]
        b = text.split("\n\nReply B: ")[1]
        answer = self.answers.pop(0) if self.answers else ("A" if len(a) < len(b) else "T" if a == b else "B")
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    server.shutdown()


def test_the_endpoint_labeler_asks_an_llm_which_reply_is_better(endpoint):
    labeler = EndpointLabeler(endpoint, "judge-model", timeout=10)
    labels = labeler.label([_pair("short.", "a longer reply."), _pair("a longer reply.", "short.")])
    assert [lab.choice for lab in labels] == ["a", "b"] and labels[0].labeler == "endpoint:judge-model"
    _Judge.answers = ["I cannot decide, sorry"]
    with pytest.raises(BadInput, match="not A, B or T"):
        labeler.label([_pair("x.", "y.")])
    with pytest.raises(BadInput, match="gave no usable answer"):
        EndpointLabeler("http://127.0.0.1:9/v1/chat/completions", "m", timeout=2).label([_pair("x.", "y.")])


def test_the_file_labeler_reads_a_persons_labels_and_names_what_is_missing(tmp_path):
    pairs = [_pair("a1", "b1"), _pair("a2", "b2")]
    labels = tmp_path / "labels.jsonl"
    labeler = FileLabeler(labels, Limits())
    with pytest.raises(LabelsMissing, match="2 of 2 pairs have no label"):
        labeler.label(pairs)
    labels.write_text(json.dumps({"id": pairs[0].id, "choice": "b", "annotator": "r7"}) + "\n")
    with pytest.raises(LabelsMissing, match=f"1 of 2 pairs have no label in {labels} \\(first: {pairs[1].id}\\)"):
        labeler.label(pairs)
    with labels.open("a") as f:
        f.write(json.dumps({"id": pairs[1].id, "choice": "tie", "time": "2026-12-03T10:00:00Z"}) + "\n")
        f.write(json.dumps({"id": "an-earlier-rounds-pair", "choice": "a"}) + "\n")
    got = labeler.label(pairs)
    assert [(g.choice, g.annotator) for g in got] == [("b", "r7"), ("tie", "anonymous")]
    labels.write_text(json.dumps({"id": pairs[0].id, "choice": "a", "annotator": "jane@example.com"}) + "\n")
    with pytest.raises(BadInput, match="looks like an e-mail address"):
        labeler.label(pairs)
    labels.write_text(json.dumps({"id": pairs[0].id, "choice": "left"}) + "\n")
    with pytest.raises(BadInput, match="line 1: expected"):
        labeler.label(pairs)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project whose SFT policy exists (`rlhf run sft`)."""
    dest = make_project(tmp_path_factory.mktemp("comparisons"), {"comparisons": {"train_pairs": 40, "test_pairs": 12}})
    run([str(BIN / "rlhf"), "run", "sft"], dest)
    return dest


def _stage(project: Path, tmp: Path, **section: object) -> tuple[int, str, Path]:
    """The stage as DVC runs it (`python -m stages.comparisons`), with `section` merged into its params."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["comparisons"] |= section
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.comparisons", "--params", str(tmp / "params.yaml"), "--out", str(tmp / "out")]
    cmd += ["--reports", str(tmp / "reports")]
    if section.get("labeler") in ("file", "human"):
        cmd += ["--labels", str(section["labels"])]
    proc = run(cmd, project, check=False)
    return proc.returncode, proc.stdout + proc.stderr, tmp / "out"


@pytest.mark.slow
def test_the_stage_with_the_simulated_labeler(project, tmp_path):
    code, said, out = _stage(project, tmp_path, labeler="simulated")
    assert code == 0, said
    metrics = json.loads((out / "metrics.json").read_text())
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    labels = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert metrics["train_pairs"] == 40 and metrics["test_pairs"] == 12 and len(pairs) == len(labels) == 52
    train_prompts = {json.loads(x)["prompt"] for x in (project / "artifacts/validate/data/prompts.jsonl").open()}
    test_prompts = {json.loads(x)["prompt"] for x in (project / "artifacts/validate/data/sft_test.jsonl").open()}
    assert {p["prompt"] for p in pairs if p["split"] == "train"} <= train_prompts
    assert {p["prompt"] for p in pairs if p["split"] == "test"} <= test_prompts  # held out: never trained on
    assert {lab["labeler"] for lab in labels} == {"simulated"} and 0 <= metrics["labeler_gold_agreement_test"] <= 1
    replies = [json.loads(x) for x in (out / "replies_test.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in replies} == test_prompts and all(len(r["replies"]) == 4 for r in replies)
    assert "labelled by simulated" in said


@pytest.mark.slow
def test_the_stage_with_an_llm_labeler(project, tmp_path, endpoint):
    code, said, out = _stage(project, tmp_path, labeler="endpoint", endpoint=endpoint, endpoint_model="m")
    assert code == 0, said
    rows = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert rows and all(len(r["chosen"]) <= len(r["rejected"]) for r in rows)  # the test's judge prefers short
    assert json.loads((out / "metrics.json").read_text())["labeler"] == "endpoint:m"


@pytest.mark.slow
def test_the_stage_waits_for_a_persons_labels_then_uses_them(project, tmp_path):
    labels = tmp_path / "labels.jsonl"
    code, said, _ = _stage(project, tmp_path, labeler="file", labels=str(labels))
    assert code == ExitCode.BAD_INPUT and "52 of 52 pairs have no label" in said and "Traceback" not in said
    to_label = [json.loads(x) for x in (tmp_path / "reports/pairs.jsonl").read_text().splitlines()]
    labels.write_text("".join(json.dumps({"id": p["id"], "choice": "a", "annotator": "r1"}) + "\n" for p in to_label))
    code, said, out = _stage(project, tmp_path, labeler="file", labels=str(labels))
    assert code == 0, said
    rows = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    pairs = [p for p in to_label if p["split"] == "train"]
    assert rows == [{"prompt": p["prompt"], "chosen": p["a"], "rejected": p["b"]} for p in pairs]


@pytest.mark.slow
def test_the_stage_with_people_in_label_studio_waits_then_trains_on_their_majority(project, tmp_path):
    export = tmp_path / "round-1.json"
    code, said, _ = _stage(project, tmp_path, labeler="human", labels=str(export), wanted=30)
    assert code == ExitCode.BAD_INPUT and "0 of 30 comparisons labelled: no Label Studio export" in said
    assert "Traceback" not in said
    made = json.loads((tmp_path / "reports/tasks.json").read_text())
    assert len(made) == 52 and (tmp_path / "reports/label_config.xml").exists()
    # two accounts label every task; the second disagrees on every third; "A" is the reply shown first
    _click_export(export, made, {i: ["A", "B" if i % 3 == 0 else "A"] for i in range(len(made))})
    code, said, out = _stage(project, tmp_path, labeler="human", labels=str(export), wanted=30)
    assert code == 0, said
    metrics = json.loads((out / "metrics.json").read_text())
    split = [i for i in range(len(made)) if i % 3 == 0]  # one against one: left out
    test_split = [i for i, t in enumerate(made) if t["data"]["split"] == "test"]
    agree_test = sum(i % 3 != 0 for i in test_split) / len(test_split)
    assert metrics["labelled_pairs"] == 52 - len(split) and metrics["split_votes"] == len(split)
    assert metrics["annotator_agreement_test"] == pytest.approx(agree_test) and metrics["annotators"] == 2
    trained = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    expected = [
        {"prompt": t["data"]["prompt"], "chosen": t["data"]["first"], "rejected": t["data"]["second"]}
        for i, t in enumerate(made)
        if t["data"]["split"] == "train" and i % 3 != 0
    ]
    assert trained == expected  # exactly the pairs both accounts agreed on, the reply shown first chosen
    assert "the annotators agree" in said and "split" in (tmp_path / "reports/round.md").read_text()


def _click_export(path: Path, made: list[dict], clicks: dict[int, list[str]]) -> None:
    """Label Studio's JSON export of `made` (tasks.json) where task i got one annotation per click in `clicks[i]`."""
    choice = lambda c: {"from_name": "choice", "to_name": "prompt", "type": "choices", "value": {"choices": [c]}}  # noqa: E731
    rows = [
        {
            "id": i + 1,
            "data": t["data"],
            "annotations": [
                {
                    "completed_by": u + 1,
                    "result": [choice(c)],
                    "was_cancelled": False,
                    "updated_at": "2026-12-04T10:00:00Z",
                }
                for u, c in enumerate(clicks.get(i, []))
            ],
        }
        for i, t in enumerate(made)
    ]
    path.write_text(json.dumps(rows))


@pytest.mark.slow
def test_a_round_closed_early_with_accept_trains_on_the_pairs_answered_so_far(project, tmp_path, monkeypatch):
    """The typed answer of a resumed flow run (`RoundAnswer.accept`, passed to the stage as RLHF_LABELS_ACCEPT)
    closes a round below `comparisons.wanted`; a count above what is answered, or no count at all, keeps it open."""
    export = tmp_path / "round-1.json"
    _stage(project, tmp_path, labeler="human", labels=str(export), wanted=30)
    made = json.loads((tmp_path / "reports/tasks.json").read_text())
    train = [i for i, t in enumerate(made) if t["data"]["split"] == "train"][:8]
    answered = train + [i for i, t in enumerate(made) if t["data"]["split"] == "test"][:2]
    _click_export(export, made, {i: ["A"] for i in answered})
    for accept in ("", "0", "eleven", "11"):  # no answer, "keep wanted", not a count, more than is answered
        monkeypatch.setenv(ACCEPT_ENV, accept)
        code, said, _ = _stage(project, tmp_path, labeler="human", labels=str(export), wanted=30)
        wanted = 11 if accept == "11" else 30
        assert code == ExitCode.BAD_INPUT and f"10 of {wanted} comparisons labelled" in said, (accept, said)
    monkeypatch.setenv(ACCEPT_ENV, "10")
    code, said, out = _stage(project, tmp_path, labeler="human", labels=str(export), wanted=30)
    assert code == 0, said
    trained = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    shown_first = [{"prompt": made[i]["data"]["prompt"], "chosen": made[i]["data"]["first"]} for i in train]
    assert [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in trained] == shown_first
    assert json.loads((out / "metrics.json").read_text())["labelled_pairs"] == 10


@pytest.mark.slow
def test_dvc_repro_while_a_round_waits_for_people_stops_at_once_with_one_line(project, tmp_path):
    """`dvc repro` of a project whose human round is open (its export holds nothing yet) ends within the timeout:
    the comparisons stage stops (exit 65) saying how many are labelled and what to do, nothing after it runs, and
    the earlier stages' outputs stay."""
    import shutil

    copy = tmp_path / "p"
    shutil.copytree(project, copy, symlinks=True)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["comparisons"] |= {"labeler": "human", "labels": "labels/round.json"}
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([str(BIN / "rlhf"), "sync"], copy)
    (copy / "labels").mkdir()
    (copy / "labels/round.json").write_text("[]\n")  # what `rlhf run` creates before the first pull
    sft = {f: f.read_bytes() for f in (copy / "artifacts/sft").rglob("*") if f.is_file()}
    proc = run([str(BIN / "dvc"), "repro", "reward"], copy, check=False, timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "0 of 52 comparisons labelled: labels/round.json holds no task yet" in said, said
    assert "exited with 65" in said and "Traceback" not in said
    assert not (copy / "artifacts/reward").exists() and not (copy / "artifacts/comparisons/preferences.jsonl").exists()
    assert {f: f.read_bytes() for f in (copy / "artifacts/sft").rglob("*") if f.is_file()} == sft
    assert (copy / "reports/comparisons/tasks.json").exists()  # the round's tasks, ready to import


def _synced(dest: Path, **comparisons: object) -> dict:
    """The project's dvc.yaml, params.yaml (with `comparisons` merged) and stages/ in `dest`, after `rlhf sync`;
    returns the params."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    (dest / "dvc.yaml").write_text((root / "dvc.yaml").read_text())
    shutil.copytree(root / "stages", dest / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["comparisons"] |= comparisons
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sync.sync(dest)
    return params


def test_sync_passes_the_labels_file_to_the_stage(tmp_path):
    _synced(tmp_path, labeler="file", labels="labels/round-1.jsonl")
    stage = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["comparisons"]
    assert ("--labels", "labels/round-1.jsonl") in sync.options(stage["cmd"])
    assert "labels/round-1.jsonl" in stage["deps"]


def test_each_round_of_people_has_a_labels_file_of_its_own(tmp_path, monkeypatch):
    """With comparisons.rounds > 1 round r's comparisons stage reads <labels>_r<r>: adding round 2's labels does not
    touch round 1's dependency (which would rerun round 1 and all after it), and round 2's Label Studio export does
    not replace round 1's. The flow finds the round's file from the stage that waits (its --reports folder)."""
    from flows import labelling

    params = _synced(tmp_path, labeler="human", labels="labels/round.json", rounds=3)
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    for stage, labels in (("comparisons", "labels/round.json"), ("comparisons_r2", "labels/round_r2.json"),
                          ("comparisons_r3", "labels/round_r3.json")):  # fmt: skip
        assert dict(sync.options(stages[stage]["cmd"]))["--labels"] == labels and labels in stages[stage]["deps"]
        others = {"labels/round.json", "labels/round_r2.json", "labels/round_r3.json"} - {labels}
        assert not others & set(stages[stage]["deps"]), stage
        reports = labelling.stage_reports(tmp_path, stage)
        assert reports == f"reports/{stage}" and labelling.labels_file("labels/round.json", reports) == labels
    assert sync.sync(tmp_path) == []  # one pass is enough: a second finds nothing to change
    labelling.ensure_labels_file(tmp_path, params, echo=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["round.json", "round_r2.json", "round_r3.json"]
    assert [sync.round_file(f, 2) for f in ("a.b/c.d.json", "labels", ".x.json")] == [
        "a.b/c.d_r2.json",
        "labels_r2",
        ".x_r2.json",
    ]

    # which round people are labelling: the flow's marker, else the first round that wrote tasks and has no outputs
    for folder in ("reports/comparisons", "reports/comparisons_r2", "artifacts/comparisons"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "reports/comparisons/tasks.json").write_text("[]")
    assert labelling.waiting_reports(tmp_path) == "reports/comparisons"
    (tmp_path / "artifacts/comparisons/metrics.json").write_text("{}")  # round 1 closed
    assert labelling.waiting_reports(tmp_path) == "reports/comparisons"  # round 2 has not written its tasks yet
    (tmp_path / "reports/comparisons_r2/tasks.json").write_text("[]")
    assert labelling.waiting_reports(tmp_path) == "reports/comparisons_r2"
    labelling.write_marker(tmp_path, {"reports": "reports/comparisons_r3"})
    assert labelling.waiting_reports(tmp_path) == "reports/comparisons_r3"

    # a person's `accept` answers the marker's round: spent once that round's stage ran, kept past the others
    from flows.pipeline import _answered
    from flows.runners import StageResult

    monkeypatch.setenv(ACCEPT_ENV, "5")
    assert not _answered(tmp_path, StageResult("comparisons_r2", "ran"))
    assert not _answered(tmp_path, StageResult("comparisons_r3", "failed", 65))
    assert _answered(tmp_path, StageResult("comparisons_r3", "ran"))
    monkeypatch.delenv(ACCEPT_ENV)
    assert not _answered(tmp_path, StageResult("comparisons_r3", "ran"))

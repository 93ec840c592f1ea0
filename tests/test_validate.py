"""stages.validate: a corpus of malformed inputs, each ending in a clear error or a quarantine entry with its reason.

The corpus is generated into tmp_path: `good` rows with one bad line at BAD_AT (line BAD_AT + 1), so a single bad row
stays within max_invalid_fraction and is quarantined, while file-level problems fail with a one-sentence message.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from stages.lib.formats import DataError, load_dataset
from stages.lib.judge import JudgeConfig
from stages.lib.outcome import ExitCode, stage_main
from stages.lib.params import PROJECT_PARAMS, defaults, load_params
from stages.validate import (
    DatasetSpec,
    ValidateConfig,
    ValidationFailed,
    _checks,
    format_report,
    load_prompts,
    main,
    run,
    validate_file,
    validate_frame,
)

ROOT = Path(__file__).resolve().parents[1]
N_GOOD = 30
BAD_AT = 5  # the bad row's 0-based position: "line 6" in messages


def pref(i: int) -> dict[str, Any]:
    return {"prompt": f"What is {i} plus 1?", "chosen": f"It is {i + 1}.", "rejected": "No idea."}


def sft(i: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"What is {i} plus 1?"}, {"role": "assistant", "content": f"{i + 1}"}]
    }


def hh(i: int) -> dict[str, Any]:
    prompt = f"\n\nHuman: What is {i} plus 1?\n\nAssistant:"
    return {"chosen": f"{prompt} It is {i + 1}.", "rejected": f"{prompt} No idea."}


def jsonl(
    bad: dict[str, Any] | str | bytes | None,
    good: Callable[[int], dict] = pref,
    n: int = N_GOOD,
    name: str = "data.jsonl",
) -> Callable[[Path], Path]:
    """A writer of `n` good rows with `bad` (an object, a raw line, or raw bytes) as line BAD_AT + 1."""

    def write(tmp: Path) -> Path:
        lines = [json.dumps(good(i)).encode() for i in range(n)]
        if bad is not None:
            raw = bad if isinstance(bad, bytes) else bad.encode() if isinstance(bad, str) else json.dumps(bad).encode()
            lines.insert(BAD_AT, raw)
        data = b"\n".join(lines) + b"\n"
        path = tmp / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        return path

    return write


def raw_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return write


def truncated_gz(tmp: Path) -> Path:
    data = gzip.compress(b"".join(json.dumps(pref(i)).encode() + b"\n" for i in range(2000)))
    (tmp / "prefs.jsonl.gz").write_bytes(data[: len(data) // 2])
    return tmp / "prefs.jsonl.gz"


def corrupt_parquet(tmp: Path) -> Path:
    path = tmp / "prefs.parquet"
    pd.DataFrame([pref(i) for i in range(10)]).to_parquet(path)
    path.write_bytes(path.read_bytes()[:-100])  # the footer (schema, row groups) is gone
    return path


def csv(text: str) -> Callable[[Path], Path]:
    return raw_file("prefs.csv", text.encode())


@dataclass(frozen=True)
class Case:
    id: str
    write: Callable[[Path], Path]
    kind: str = "preferences"
    fmt: str = "auto"
    config: dict[str, Any] = field(default_factory=dict)
    heldout: frozenset[str] = frozenset()
    error: tuple[str, ...] = ()  # the run fails with a message holding all of these
    quarantine: tuple[str, str] = ("", "")  # else line BAD_AT + 1 is quarantined: (check name, reason fragment)


CORPUS = [
    # file-level problems: DataError, one sentence naming the file and the problem
    Case("missing-file", lambda tmp: tmp / "nope.jsonl", error=("nope.jsonl does not exist",)),
    Case("empty-file", raw_file("empty.jsonl", b""), error=("empty.jsonl is empty",)),
    Case("only-blank-lines", raw_file("blank.jsonl", b"\n  \n\n"), error=("blank.jsonl is empty",)),
    Case("truncated-gz", truncated_gz, error=("prefs.jsonl.gz is a truncated or corrupt gzip file",)),
    Case("unknown-extension", raw_file("prefs.txt", b"hello"), error=("prefs.txt has an unsupported file type",)),
    Case("corrupt-parquet", corrupt_parquet, error=("prefs.parquet is not a readable parquet file",)),
    Case("csv-missing-column", csv("prompt,chosen\nq,a\n"), error=("missing required column(s) rejected",)),
    Case(
        "csv-not-utf8",
        raw_file("prefs.csv", b"prompt,chosen,rejected\nq,a,b\nq\xff,a,b\n"),
        error=("prefs.csv is not valid UTF-8 at line 3 (byte 0xff)",),
    ),
    Case(
        "csv-bad-quoting",
        csv('prompt,chosen,rejected\n"q,a,b\n'),
        error=("could not parse CSV file", "at line 2: unexpected end of data"),
    ),
    Case(
        "missing-columns",
        jsonl(None, good=lambda i: {"prompt": "q", "chosen": "a"}),
        error=("missing required column(s) rejected for format pairs",),
    ),
    Case(
        "undetectable-format",
        jsonl(None, good=lambda i: {"question": "q", "answer": "a"}),
        error=("could not detect the format", "columns answer, question"),
    ),
    Case("json-not-a-list", raw_file("prefs.json", b'{"prompt": "q"}'), error=("must hold a JSON list of objects",)),
    # dataset-level failures: ValidationFailed naming each failed check, with counts and example rows
    Case(
        "too-many-bad-rows",
        jsonl({"prompt": "q", "chosen": "", "rejected": "b"}, n=5),
        error=(
            "FAILED",
            "1 of 6 rows (16.7%) failed checks, more than max_invalid_fraction 5.0%",
            "not_blank(chosen): 1 row(s)",
            "line 6: 'chosen' is empty or whitespace only",
        ),
    ),
    Case(
        "row-count-below-min",
        jsonl(None, n=3),
        config={"min_rows": 10},
        error=("row_count: row count must be between 10 and", "observed: 3"),
    ),
    Case(
        "policy-fail",
        jsonl({"prompt": "q", "chosen": "same", "rejected": "same"}),
        config={"policy": "fail"},
        error=("policy is 'fail'", "chosen_differs: 1 row(s)", "line 6"),
    ),
    Case(
        "all-rows-unreadable",
        raw_file("bad.jsonl", b"{not json\n[1]\n"),
        error=(
            "row_count",
            "valid_json: 2 row(s)",
            "line 1: is not valid JSON",
            "line 2: is a JSON array, not an object",
        ),
    ),
    # row-level problems: quarantined (1 of 31 rows) with the check they fail and a reason
    Case(
        "empty-string",
        jsonl({"prompt": "q", "chosen": "", "rejected": "b"}),
        quarantine=("not_blank(chosen)", "empty or whitespace only"),
    ),
    Case(
        "whitespace-only-response",
        jsonl({"prompt": "q", "chosen": " \t\n ", "rejected": "b"}),
        quarantine=("not_blank(chosen)", "empty or whitespace only"),
    ),
    Case(
        "whitespace-only-prompt",
        jsonl({"prompt": "   ", "chosen": "a", "rejected": "b"}),
        quarantine=("not_blank(prompt)", "empty or whitespace only"),
    ),
    Case(
        "chosen-equals-rejected",
        jsonl({"prompt": "q", "chosen": "same", "rejected": " same"}),
        quarantine=("chosen_differs", "chosen and rejected are identical"),
    ),
    Case(
        "non-utf8-bytes",
        jsonl(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'),
        quarantine=("valid_utf8", "not valid UTF-8 (byte 0xe9 at offset 15)"),
    ),
    Case(
        "number-instead-of-string",
        jsonl({"prompt": "q", "chosen": 42, "rejected": "b"}),
        quarantine=("is_string(chosen)", "'chosen' is a number (42), expected a string"),
    ),
    Case(
        "list-instead-of-string",
        jsonl({"chosen": ["a", "b"], "rejected": "x"}, good=hh),
        quarantine=("is_string(chosen)", "'chosen' is a list, expected a string"),
    ),
    Case(
        "list-of-non-messages",
        jsonl({"prompt": "q", "chosen": ["a"], "rejected": "b"}),
        quarantine=("valid_messages(chosen)", "message 0 is a str, expected an object"),
    ),
    Case(
        "ten-megabyte-row",
        jsonl({"prompt": "q", "chosen": "x" * 10_000_000, "rejected": "b"}),
        quarantine=("row_size", "is longer than validate.max_row_bytes (1048576 bytes)"),
    ),
    Case(
        "long-reply",
        jsonl({"prompt": "q", "chosen": "x" * 5000, "rejected": "b"}),
        quarantine=("max_length(chosen)", "longer than 4096 characters"),
    ),
    Case(
        "short-reply",
        jsonl({"prompt": "What is up?", "chosen": "ok", "rejected": "not much"}),
        config={"min_chars": 3},
        quarantine=("min_length(chosen)", "shorter than 3 characters"),
    ),
    Case(
        "long-prompt",
        jsonl({"prompt": "why " * 2000, "chosen": "a", "rejected": "b"}),
        quarantine=("max_length(prompt)", "longer than 4096 characters"),
    ),
    Case("duplicate-pair", jsonl(pref(0)), quarantine=("no_duplicates", "duplicate of an earlier row")),
    Case(
        "hh-prefix-mismatch",
        jsonl({"chosen": "\n\nHuman: A?\n\nAssistant: a", "rejected": "\n\nHuman: B?\n\nAssistant: b"}, good=hh),
        quarantine=("hh_transcript", "HH transcripts do not share a prompt prefix"),
    ),
    Case(
        "hh-no-assistant-marker",
        jsonl({"chosen": "\n\nHuman: A? a", "rejected": "\n\nHuman: A?\n\nAssistant: b"}, good=hh),
        quarantine=("hh_transcript", "'chosen' has no '\\n\\nAssistant:' turn"),
    ),
    Case(
        "implicit-prompt-mismatch",
        jsonl(
            {
                "chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "b"}],
            }
        ),
        quarantine=("shared_prompt", "do not share a prompt prefix"),
    ),
    Case("invalid-json-line", jsonl('{"prompt": "q", "chosen": "a",'), quarantine=("valid_json", "not valid JSON")),
    Case(
        "json-array-not-object", jsonl('["q", "a", "b"]'), quarantine=("valid_json", "is a JSON array, not an object")
    ),
    Case(
        "null-value",
        jsonl({"prompt": "q", "chosen": "a", "rejected": None}),
        quarantine=("not_null(rejected)", "'rejected' is null"),
    ),
    Case(
        "missing-key-in-one-row",
        jsonl({"prompt": "q", "chosen": "a"}),
        quarantine=("has_field(rejected)", "missing field 'rejected'"),
    ),
    Case(
        "messages-not-a-list",
        jsonl({"messages": "Hi!"}, good=sft),
        kind="sft",
        quarantine=("valid_messages(messages)", "'messages' is a str, expected a list of messages"),
    ),
    Case(
        "messages-missing-role",
        jsonl({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, good=sft),
        kind="sft",
        quarantine=("valid_messages(messages)", "message 0 has no string 'role'"),
    ),
    Case(
        "messages-unknown-role",
        jsonl({"messages": [{"role": "wizard", "content": "Hi"}]}, good=sft),
        kind="sft",
        quarantine=("valid_messages(messages)", "message 0 has unknown role 'wizard'"),
    ),
    Case(
        "sft-messages-without-assistant",
        jsonl({"messages": [{"role": "user", "content": "Hi"}]}, good=sft),
        kind="sft",
        quarantine=("valid_messages(messages)", "'messages' has no assistant turn"),
    ),
    Case(
        "heldout-prompt-leak",
        jsonl({"prompt": "Secret test question?", "chosen": "a", "rejected": "b"}),
        heldout=frozenset({"\n\nHuman: Secret test question?\n\nAssistant:"}),
        quarantine=("no_heldout_leak", "prompt also appears in a held-out dataset"),
    ),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_malformed_input_is_named(case: Case, tmp_path: Path) -> None:
    path = case.write(tmp_path)
    config = defaults(ValidateConfig, **case.config)
    if case.error:
        try:
            report = validate_file(path, case.kind, case.fmt, config=config, heldout_prompts=case.heldout)
            assert not report.passed, format_report(report)
            message = ValidationFailed([report]).details
        except DataError as e:
            message = str(e)
            assert "\n" not in message and path.name in message  # one sentence naming the file
        for fragment in case.error:
            assert fragment in message, message
        return
    loaded = load_dataset(path, case.kind, case.fmt)
    report, valid, failed = validate_frame(loaded, case.kind, config, case.heldout, "case")
    assert report.passed and report.n_quarantined == 1, format_report(report)
    assert report.n_rows == N_GOOD + 1 and report.n_valid == N_GOOD
    check, fragment = case.quarantine
    (entry,) = failed
    assert entry["source_row"] == BAD_AT and entry["dataset"] == "case"
    assert any(r.startswith(check + ": ") and fragment in r for r in entry["reasons"]), entry["reasons"]
    assert len(entry["excerpt"]) <= 83
    assert BAD_AT not in set(valid["source_row"])
    (failed_check,) = [c for c in report.checks if not c["success"]]
    assert failed_check["name"] == check and failed_check["examples"][0]["where"] == f"line {BAD_AT + 1}"
    text = format_report(report)
    assert f"- {check}: 1 row(s)" in text and f"line {BAD_AT + 1}: " in text


def test_the_corpus_exercises_every_kind_of_row_check() -> None:
    """Each family of row-level check the suites can report (is_string, not_null, max_length, ...) quarantines a
    row of the corpus: a check added without a hostile input that trips it fails here."""
    families = {
        c.name.split("(")[0]
        for kind in ("preferences", "sft", "prompts")
        for c in _checks(kind, defaults(ValidateConfig, min_chars=2, unique_kinds=("preferences",)), frozenset({"x"}))
        if c.level == "row"
    }
    covered = {c.quarantine[0].split("(")[0] for c in CORPUS if c.quarantine[0]}
    assert families - covered == set()


def test_duplicates_keep_the_first_occurrence(tmp_path: Path) -> None:
    loaded = load_dataset(jsonl(pref(0))(tmp_path), "preferences")
    _, valid, failed = validate_frame(loaded, "preferences", defaults(ValidateConfig))
    assert [e["source_row"] for e in failed] == [BAD_AT]
    assert 0 in set(valid["source_row"])


def test_prompts_may_repeat_unless_asked(tmp_path: Path) -> None:
    loaded = load_dataset(jsonl(None, good=lambda i: {"prompt": f"q{i % 3}"})(tmp_path), "prompts")
    assert validate_frame(loaded, "prompts", defaults(ValidateConfig))[0].passed
    report, _, _ = validate_frame(loaded, "prompts", defaults(ValidateConfig, unique_kinds=("prompts",)))
    assert not report.passed and "no_duplicates: 27 row(s)" in format_report(report)


def test_load_prompts_reads_any_kind(tmp_path: Path) -> None:
    assert load_prompts(jsonl(None, n=2)(tmp_path)) == [
        "\n\nHuman: What is 0 plus 1?\n\nAssistant:",
        "\n\nHuman: What is 1 plus 1?\n\nAssistant:",
    ]
    assert len(load_prompts(jsonl(None, good=sft, n=4, name="sft.jsonl")(tmp_path))) == 4


# --- the command line: a clear message and exit code 2, never a traceback -------------------------------------

CLI_CASES = {  # case id -> text the output must show
    "truncated-gz": "truncated or corrupt gzip file",
    "unknown-extension": "unsupported file type",
    "too-many-bad-rows": "not_blank(chosen): 1 row(s)",
    "messages-missing-role": "quarantined",  # passes: exit 0 with the report
}


@pytest.mark.parametrize("case_id", list(CLI_CASES))
def test_cli_never_shows_a_traceback(case_id: str, tmp_path: Path) -> None:
    case = next(c for c in CORPUS if c.id == case_id)
    path = case.write(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GX_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.validate", "--file", str(path), "--kind", case.kind, "--format", case.fmt],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == (0 if case.quarantine[0] else ExitCode.BAD_INPUT), proc.stderr
    assert CLI_CASES[case_id] in proc.stdout + proc.stderr


# --- the stage ------------------------------------------------------------------------------------------------


def stage_inputs(tmp: Path, bad_pref: dict[str, Any] | None = None) -> dict[str, DatasetSpec]:
    data = tmp / "data"
    data.mkdir()
    files = {
        "sft": (jsonl(None, good=sft, name="sft.jsonl"), "sft", False),
        "preferences": (jsonl(bad_pref, name="preferences.jsonl"), "preferences", False),
        "preferences_test": (
            jsonl(None, n=5, name="preferences_test.jsonl", good=lambda i: {**pref(i), "prompt": f"Test {i}?"}),
            "preferences",
            True,
        ),
        "prompts": (jsonl(None, good=lambda i: {"prompt": f"Train {i}?"}, name="prompts.jsonl"), "prompts", False),
        "eval_prompts": (jsonl(None, good=lambda i: {"prompt": f"Eval {i}?"}, n=4, name="eval.jsonl"), "prompts", True),
    }
    return {
        name: DatasetSpec(str(write(data)), kind, "auto", heldout) for name, (write, kind, heldout) in files.items()
    }


def test_stage_writes_data_quarantine_reports_and_data_docs(tmp_path: Path) -> None:
    # the bad row is a held-out prompt leaking into training: quarantined with its reason
    specs = stage_inputs(tmp_path, bad_pref={"prompt": "Test 3?", "chosen": "a", "rejected": "b"})
    out, reports = tmp_path / "out", tmp_path / "reports"
    result = run(defaults(ValidateConfig), specs, out, reports, judge=defaults(JudgeConfig))

    for name in specs:
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(set(r) <= {"prompt", "chosen", "rejected", "response"} for r in rows)
    (quarantined,) = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert quarantined["dataset"] == "preferences" and quarantined["source_row"] == BAD_AT
    assert quarantined["reasons"] == ["no_heldout_leak: prompt also appears in a held-out dataset"]
    metrics = json.loads(
        (out.parent / "metrics.json").read_text()
    )  # beside the data dir (DVC metrics cannot overlap outs)
    assert metrics["preferences"] == {"n_rows": 31, "n_valid": 30, "n_quarantined": 1, "passed": True}
    assert result["metrics"] == metrics

    summary = json.loads((reports / "summary.json").read_text())
    assert summary["passed"] is True
    checks = {c["name"]: c for c in summary["datasets"]["preferences"]["checks"]}
    assert {"row_count", "chosen_differs", "no_duplicates", "no_heldout_leak", "valid_utf8"} <= set(checks)
    assert checks["no_heldout_leak"]["unexpected_count"] == 1
    assert "no_heldout_leak" not in {c["name"] for c in summary["datasets"]["preferences_test"]["checks"]}
    assert "Dataset 'preferences'" in (reports / "report.md").read_text()
    docs = reports / "data_docs"
    assert (docs / "index.html").is_file()
    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == len(specs)
    assert "preferences_train_suite" in (docs / "index.html").read_text()


def test_failing_stage_keeps_previous_outputs_and_explains(tmp_path: Path) -> None:
    specs = stage_inputs(tmp_path)
    specs["sft"] = DatasetSpec(str(tmp_path / "data" / "missing.jsonl"), "sft")
    out, reports = tmp_path / "out", tmp_path / "reports"
    out.mkdir()
    (out / "preferences.jsonl").write_text("previous\n")
    with pytest.raises(ValidationFailed) as info:
        run(defaults(ValidateConfig), specs, out, reports, judge=defaults(JudgeConfig))
    details = info.value.details
    assert "Dataset 'sft'" in details and "missing.jsonl does not exist" in details
    assert "Dataset 'preferences'" not in details  # only the failed datasets are in the message
    assert info.value.reason.startswith("validation failed: sft (") and "\n" not in info.value.reason
    assert (out / "preferences.jsonl").read_text() == "previous\n"
    assert sorted(p.name for p in out.iterdir()) == ["preferences.jsonl"]
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["passed"] is False and summary["datasets"]["preferences"]["passed"] is True


def test_main_reads_params_and_exits_bad_input_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = stage_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = load_params(PROJECT_PARAMS)
    params["validate"] |= {"policy": "quarantine", "min_rows": 1}
    params["data"] = {n: vars(s) for n, s in specs.items()}
    Path("params.yaml").write_text(json.dumps(params))  # JSON is YAML
    assert stage_main("validate", lambda: main([])) == 0
    assert (tmp_path / "artifacts/validate/data/sft.jsonl").is_file()
    assert (tmp_path / "reports/validate/summary.json").is_file()

    params["validate"]["min_rows"] = 1000
    Path("params.yaml").write_text(json.dumps(params))
    assert stage_main("validate", lambda: main([])) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "row_count: row count must be between 1000" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("policy", "n_bad", "passed", "reason"),
    [
        ("quarantine", 0, True, "all checks passed"),
        ("quarantine", 5, True, "5 of 100 rows (5.0%) quarantined"),  # exactly at the limit: still quarantined
        ("quarantine", 6, False, "6 of 100 rows (6.0%) failed checks, more than max_invalid_fraction 5.0%"),
        ("fail", 1, False, "1 of 100 rows failed checks and the policy is 'fail'"),
    ],
)
def test_verdict_thresholds(policy: str, n_bad: int, passed: bool, reason: str) -> None:
    from stages.validate import verdict

    got = verdict(defaults(ValidateConfig, policy=policy), 100, n_bad, 100 - n_bad, [])
    assert got[0] is passed and got[1].startswith(reason)
    assert verdict(defaults(ValidateConfig), 100, 0, 100, ["row_count"]) == (
        False,
        "dataset-level check(s) failed: row_count",
    )


def test_config_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="validate.policy = 'quarantin': expected one of 'fail', 'quarantine'"):
        defaults(ValidateConfig, policy="quarantin")

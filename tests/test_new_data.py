"""Runs that pick up what arrived (issue 25, item 4): a batch of labelled pairs dropped into data/incoming/ is
validated on its own, joins the preferences, is committed to data.dvc by the next run, and retrains what depends on
it; a run with nothing new says so in one line and opens no MLflow run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, make_project, run

SMALL = {
    "reward_gate": OPEN_GATE,
    "ppo": {"num_steps": 2, "batch_size": 8, "ppo_epochs": 1, "response_length": 12, "n_monitor": 4, "keep": "last"},
    "evaluate": {"n_prompts": 16, "max_new_tokens": 12},
    "promote": OPEN_PROMOTE,
}


def validate(project: Path, check: bool = True):  # noqa: ANN201
    return run([sys.executable, "-m", "stages.validate", "--data", "data"], project, check=check)


def metrics(project: Path) -> dict:
    return json.loads((project / "artifacts/validate/metrics.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_batch_is_checked_on_its_own_and_joins_its_dataset(tmp_path):
    project = make_project(tmp_path / "p")
    run([str(BIN / "rlhf"), "make-data", "--batch", "1", "--pairs", "20"], project)
    batch = project / "data/incoming/batch-001.jsonl"
    new = rows(batch)
    assert len(new) == 20 and all(r["chosen"] != r["rejected"] for r in new)
    known = rows(project / "data/preferences.jsonl")
    # a second delivery: two pairs already known (delivered twice), 20 new ones and one broken row (under 5%)
    run([str(BIN / "rlhf"), "make-data", "--batch", "2", "--pairs", "20"], project)
    second = project / "data/incoming/batch-002.jsonl"
    broken = {"prompt": "Please add 1 and 2.", "chosen": "", "rejected": "It is 3."}
    second.write_text("".join(json.dumps(r) + "\n" for r in [*known[:2], *rows(second), broken]))
    validate(project)
    m = metrics(project)
    assert m["preferences/batch-001.jsonl"] == {"n_rows": 20, "n_valid": 20, "n_quarantined": 0, "passed": True}
    assert m["preferences/batch-002.jsonl"] == {"n_rows": 23, "n_valid": 22, "n_quarantined": 1, "passed": True}
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    fresh = {key(r) for r in rows(batch) + rows(second)[:-1]} - {key(r) for r in known}
    assert m["preferences"]["n_batches"] == 2 and m["preferences"]["n_from_batches"] == len(fresh) >= 20
    assert m["preferences"]["n_repeats_dropped"] == 42 - len(fresh) >= 2
    # the quarantined row names its batch file and line; the report lists each batch on its own
    quarantined = rows(project / "artifacts/validate/data/quarantine.jsonl")
    assert [(q["dataset"], q["source_row"]) for q in quarantined] == [
        ("preferences/batch-002.jsonl", 22)
    ]  # 0-based: line 23
    assert "batch-002.jsonl" in (project / "reports/validate/report.md").read_text()
    # the batch's pairs join the dataset (held-out ones are split off by prompt later, as for any pair)
    assert m["preferences"]["n_joined"] == m["preferences"]["n_valid"] + len(fresh)
    published = [rows(project / "artifacts/validate/data" / f) for f in ("preferences.jsonl", "preferences_test.jsonl")]
    assert {(c, r) for _, c, r in fresh} <= {(x["chosen"], x["rejected"]) for file in published for x in file}


def test_a_batch_that_fails_its_checks_stops_validation_naming_the_file(tmp_path):
    project = make_project(tmp_path / "p", {"validate": {"policy": "fail"}})
    (project / "data/incoming").mkdir()
    (project / "data/incoming/late.jsonl").write_text('{"prompt": "Hi", "chosen": "Hello!"}\nnot json\n')
    done = validate(project, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "data/incoming/late.jsonl is missing required column(s) rejected" in done.stderr, done.stderr[-2000:]
    assert not (project / "artifacts/validate/data").exists()  # nothing published


def test_a_batch_that_lands_while_validation_reads_the_folder_stops_it_busy_publishing_nothing(tmp_path, monkeypatch):
    """A delivery is not atomic on every machine: a batch that appears (or grows) while validation reads the folder
    would be half-read or not read at all while DVC records the folder as it is after. Validation says so and
    publishes nothing; the next run reads it whole."""
    from stages import validate as v
    from stages.lib.outcome import Busy
    from stages.lib.params import config_from, load_params

    project = make_project(tmp_path / "p")
    run([str(BIN / "rlhf"), "make-data", "--batch", "1", "--pairs", "8"], project)
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    datasets = v.expand_drops(
        {n: config_from(v.DatasetSpec, s, at=f"data.{n}") for n, s in params["data"].items()}, project
    )
    real_check = v.check_datasets

    def check_then_deliver(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        checked = real_check(*args, **kwargs)
        run([str(BIN / "rlhf"), "make-data", "--batch", "2", "--pairs", "8"], project)  # lands mid-run
        with (project / "data/incoming/batch-001.jsonl").open("a") as f:  # and the first one grows
            f.write('{"prompt": "Hi", "chosen": "Hello!", "rej')
        return checked

    monkeypatch.setattr(v, "check_datasets", check_then_deliver)
    config, judge = (
        config_from(v.ValidateConfig, params.get("validate")),
        config_from(v.JudgeConfig, params.get("judge")),
    )
    with pytest.raises(Busy) as stopped:
        v.run(config, datasets, project / "out", project / "reports", project / "m.json", judge=judge)
    assert "new: data/incoming/batch-002.jsonl; changed: data/incoming/batch-001.jsonl" in stopped.value.reason
    assert "nothing was written" in stopped.value.reason
    assert not (project / "out").exists() and not (project / "m.json").exists()
    assert "batch-002.jsonl" in (project / "reports/report.md").read_text()  # the report says why, too


@pytest.mark.slow
def test_a_run_picks_up_a_new_batch_and_one_with_nothing_new_says_so(tmp_path):
    project = make_project(tmp_path / "p", SMALL)
    run([str(BIN / "rlhf"), "run", "--prefect"], project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    parents = lambda: client.search_runs(  # noqa: E731
        [client.get_experiment_by_name("rlhf").experiment_id], "tags.`rlhf.stage` = 'pipeline'"
    )
    assert len(parents()) == 1

    again = run([str(BIN / "rlhf"), "run", "--prefect"], project)
    said = [ln for ln in again.stdout.splitlines() if ln.startswith("nothing new")]
    assert len(said) == 1 and "all 10 stages up to date, nothing ran" in said[0], again.stdout[-2000:]
    assert len(parents()) == 1  # no empty pipeline run in MLflow

    before = (project / "data.dvc").read_text()
    run([str(BIN / "rlhf"), "make-data", "--batch", "1", "--pairs", "24"], project)
    third = run([str(BIN / "rlhf"), "run", "--prefect"], project)
    out = third.stdout + third.stderr
    assert "new data: data/ changed since data.dvc" in out, out[-3000:]
    assert "ran: validate, sft, comparisons" in third.stdout, third.stdout[-2000:]
    after = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]
    assert (project / "data.dvc").read_text() != before and after["nfiles"] == 8  # the batch is in data.dvc's version
    assert 0 < metrics(project)["preferences"]["n_from_batches"] <= 24
    assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout) == {}
    assert len(parents()) == 2

"""A team's own preference data, end to end: one file of long multi-turn HH-RLHF dialogues, outside the project.

`rlhf make-data --dialogues` writes the real shape (histories several times the tiny model's context, a few broken
rows); params.yaml names only that file; every stage completes through `rlhf run` and real DVC, cutting what does not
fit the context and saying how much; the policy is graded by a judge reward model trained on pairs the reward model
never saw; and the file is a DVC dependency: editing it reruns validation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.lib.context import n_tokens
from stages.lib.io import read_jsonl
from stages.lib.modeling import load_causal_lm
from stages.lib.outcome import ExitCode
from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, make_project, run

pytestmark = pytest.mark.slow

SMALL = {
    "reward_gate": OPEN_GATE,  # a 2-layer model on dialogues: the test is about the data, not the gate
    "judge": {"kind": "reward_model"},  # what `auto` picks for data that is not the default task's
    "ppo": {
        "num_steps": 2,
        "batch_size": 8,
        "ppo_epochs": 1,
        "response_length": 16,
        "checkpoint_every": 1,
        "n_monitor": 8,
        "threads": 1,
    },
    "evaluate": {"n_prompts": 16, "max_new_tokens": 16},
    "promote": OPEN_PROMOTE,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    dialogues = root / "team-data" / "hh.jsonl"  # outside the project
    project = make_project(root / "proj", SMALL)
    run([str(BIN / "rlhf"), "make-data", "--dialogues", "500", "--out", str(dialogues)], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"] = {"preferences": {"path": str(dialogues), "kind": "preferences", "format": "auto"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([str(BIN / "rlhf"), "run"], project, timeout=1800)
    return project


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / f"artifacts/{stage}/metrics.json").read_text())


def test_every_stage_completes_on_dialogues_longer_than_the_context(project):
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == set(stages)
    model, tokenizer = load_causal_lm(project / "artifacts/sft/model")
    context = model.config.n_positions
    prompts = [r["prompt"] for r in read_jsonl(project / "artifacts/validate/data/preferences.jsonl")]
    longest = max(n_tokens(tokenizer, p) for p in prompts)
    assert longest > 3 * context, (longest, context)  # several times the model's context

    validated = _metrics(project, "validate")
    assert validated["preferences"]["n_quarantined"] > 0  # the broken rows, set aside with their reasons
    assert all(
        validated[n]["derived"]
        for n in ("preferences_test", "sft", "sft_test", "prompts", "eval_prompts", "judge_preferences")
    )
    # every stage that feeds text to a model says how much it cut
    assert _metrics(project, "sft")["train_truncated_prompts"] > 0
    assert _metrics(project, "reward")["train_truncated_prompts"] > 0
    assert _metrics(project, "ppo")["truncated_prompts"] > 0
    assert _metrics(project, "evaluate")["ppo/truncated_prompts"] > 0
    assert (project / "artifacts/promote/metrics.json").exists()


def test_the_judge_is_not_the_reward_model_ppo_climbed(project):
    evaluation = _metrics(project, "evaluate")
    assert evaluation["judge"] == "judge-rm"
    report = (project / "artifacts/evaluate/report.md").read_text()
    assert "judge: judge-rm (not the reward model PPO optimised)" in report
    # trained on pairs whose prompts the reward model never saw, with its own seed: different weights
    data = project / "artifacts/validate/data"
    rm_prompts = {r["prompt"] for r in read_jsonl(data / "preferences.jsonl")}
    judge_prompts = {r["prompt"] for r in read_jsonl(data / "judge_preferences.jsonl")}
    assert rm_prompts and judge_prompts and not rm_prompts & judge_prompts
    rm = load_file(project / "artifacts/reward/model/model.safetensors")
    judge = load_file(project / "artifacts/judge/model/model/model.safetensors")
    assert not torch.equal(rm["score.weight"], judge["score.weight"])
    # the gate, lacking a labeler ceiling for these pairs, measured the RM against the judge RM and says so
    gate = _metrics(project, "reward_gate")
    assert gate["ceiling"] == _metrics(project, "judge")["accuracy"] and "judge reward model" in gate["ceiling_source"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`rlhf.stage` = 'evaluate'")
    assert runs and runs[0].data.tags["rlhf.judge"] == "judge-rm"


def test_the_users_file_is_a_dvc_dependency(project):
    dvc = [sys.executable, "-m", "dvc"]
    path = yaml.safe_load((project / "params.yaml").read_text())["data"]["preferences"]["path"]
    deps = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["validate"]["deps"]
    assert path in deps
    locked = {d["path"]: d for d in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["validate"]["deps"]}
    assert locked[path]["md5"]  # dvc.lock records its hash
    assert json.loads(run([*dvc, "status", "--json"], project).stdout) == {}

    with open(path, "a") as f:  # the team adds one pair
        row = read_jsonl(path)[0]
        f.write(json.dumps({"chosen": row["chosen"] + " Indeed.", "rejected": row["rejected"]}) + "\n")
    assert "validate" in json.loads(run([*dvc, "status", "--json"], project).stdout)
    rerun = run([*dvc, "repro", "--single-item", "validate"], project)
    assert "Running stage 'validate'" in rerun.stdout + rerun.stderr
    after = {d["path"]: d for d in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["validate"]["deps"]}
    assert after[path]["md5"] != locked[path]["md5"]


def test_plain_dvc_refuses_a_data_file_it_does_not_track(project, tmp_path):
    """Without `rlhf sync`, `dvc repro` would validate a file DVC does not track: the stage says so instead."""
    other = tmp_path / "more.jsonl"
    other.write_text(
        Path(yaml.safe_load((project / "params.yaml").read_text())["data"]["preferences"]["path"]).read_text()
    )
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["preferences"]["path"] = str(other)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([sys.executable, "-m", "dvc", "repro", "--single-item", "validate"], project, check=False)
    assert proc.returncode != 0 and f"exited with {ExitCode.BAD_INPUT}" in proc.stdout + proc.stderr
    assert "rlhf sync" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    run([str(BIN / "rlhf"), "sync"], project)
    assert str(other) in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["validate"]["deps"]

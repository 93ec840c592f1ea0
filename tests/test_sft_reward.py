"""SFT and reward-model stages on tiny sizes, through the real CLI, real DVC and a real MLflow SQLite store."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.lib.io import read_jsonl, write_jsonl
from stages.lib.modeling import create_base_model
from stages.lib.outcome import ExitCode
from stages.lib.params import load_config
from stages.sft import SFTConfig
from tests.helpers import OPEN_GATE, TINY, make_project, run

pytestmark = pytest.mark.slow


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _mlflow_runs(project: Path) -> dict[str, dict]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {
        r.data.tags["rlhf.stage"]: {
            "status": r.info.status,
            "metrics": r.data.metrics,
            "tags": r.data.tags,
            "artifacts": [a.path for a in client.list_artifacts(r.info.run_id)],
        }
        for r in runs
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project run through validate, sft and reward with `rlhf run` (dvc repro)."""
    dest = make_project(tmp_path_factory.mktemp("proj"), {"reward_gate": OPEN_GATE})
    run([str(Path(sys.executable).parent / "rlhf"), "run", "reward_gate"], dest)
    return dest


def test_sft_writes_artifacts_and_changes_weights(project):
    out = project / "artifacts" / "sft"
    for name in ("model/model.safetensors", "model/tokenizer.json", "metrics.json", "samples.jsonl", "loss.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity"] > 1 and "gold_before" in metrics and "gold_after" in metrics
    # The starting model is rebuilt deterministically from the same seed and data: SFT must have moved it.
    rows = read_jsonl(project / "artifacts/validate/data/sft.jsonl")
    texts = [r["prompt"] + " " + r["response"] for r in rows]
    texts += [
        " ".join(r.values())
        for n in ("preferences", "prompts")
        for r in read_jsonl(project / f"artifacts/validate/data/{n}.jsonl")
    ]
    shape = load_config(SFTConfig, "sft", project / "params.yaml").tiny  # the shape the stage built from
    base = create_base_model("tiny-gpt2", shape, texts, project / "base", 0)
    before, after = load_file(base / "model.safetensors"), load_file(out / "model/model.safetensors")
    assert before.keys() == after.keys()
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_reward_writes_model_stats_plots_and_the_gate_judges_them(project):
    out = project / "artifacts" / "reward"
    for name in ("model/model.safetensors", "norm.json", "calibration.png", "accuracy.png", "metrics.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["n_test"] == TINY["task"]["n_pairs_test"]
    verdict = json.loads((project / "artifacts/reward_gate/metrics.json").read_text())
    assert verdict["passed"] is True and verdict["reason"].startswith("reward-model gate passed")
    assert verdict["accuracy"] == metrics["accuracy"] and verdict["ceiling"] is not None
    assert verdict["ceiling_source"] == "the simulated labeler's agreement with the gold judge"
    assert json.loads((project / "artifacts/reward_gate/passed.json").read_text()) == {"passed": True}
    norm = json.loads((out / "norm.json").read_text())
    assert norm["std"] > 0 and norm["n"] == TINY["reward"]["n_norm_samples"]
    sft_w = load_file(project / "artifacts/sft/model/model.safetensors")
    rm_w = load_file(out / "model/model.safetensors")
    shared = [k for k in rm_w if k.removeprefix("transformer.") in {s.removeprefix("transformer.") for s in sft_w}]
    assert shared and "score.weight" in rm_w


def test_every_stage_is_an_mlflow_run(project):
    runs = _mlflow_runs(project)
    assert set(runs) >= {"validate", "sft", "reward", "reward_gate"}
    assert all(r["status"] == "FINISHED" for r in runs.values())
    assert "sft/loss" in runs["sft"]["metrics"] and "perplexity" in runs["sft"]["metrics"]
    assert "accuracy" in runs["reward"]["metrics"] and runs["reward_gate"]["tags"]["rlhf.gate"] == "passed"
    assert "model" in runs["sft"]["artifacts"] and "model" in runs["reward"]["artifacts"]


def test_dvc_metrics_show_the_stages(project):
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project).stdout)
    files = next(iter(shown.values()))["data"]
    assert {"artifacts/sft/metrics.json", "artifacts/reward/metrics.json"} <= set(files)


def test_gate_failure_stops_the_pipeline_and_keeps_earlier_artifacts(tmp_path):
    """An RM trained on shuffled labels cannot agree with held-out labels: the gate stops the pipeline there."""
    project = make_project(tmp_path / "proj", {"task": {"n_pairs_test": 200}})
    rng = random.Random(0)
    path = project / "data/preferences.jsonl"  # the training labels only; the held-out labels stay true
    rows = read_jsonl(path)
    write_jsonl(
        path, [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if rng.random() < 0.5 else r for r in rows]
    )
    run([sys.executable, "-m", "dvc", "add", "-q", "data"], project)

    proc = run([str(Path(sys.executable).parent / "rlhf"), "run"], project, check=False)
    assert proc.returncode == ExitCode.GATE
    assert "reward-model gate failed" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    verdict = json.loads((project / "artifacts/reward_gate/metrics.json").read_text())
    assert verdict["passed"] is False and "held-out accuracy" in verdict["reason"]
    # The earlier stages completed and are recorded as up to date (the reward model too: the gate judged it, a
    # looser gate re-judges it without retraining); the gate is not; nothing after it ran.
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)
    assert not {"validate", "sft", "reward"} & set(status) and "reward_gate" in status
    assert (project / "artifacts/reward/model/model.safetensors").exists()
    assert not (project / "artifacts/reward_gate/passed.json").exists() and not (project / "artifacts/ppo").exists()
    runs = _mlflow_runs(project)
    assert runs["reward_gate"]["tags"]["rlhf.gate"] == "failed"

    # loosening the gate re-judges the saved numbers: the reward model is not retrained
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["reward_gate"] = {**params["reward_gate"], **OPEN_GATE}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([str(Path(sys.executable).parent / "rlhf"), "run", "reward_gate"], project)
    assert "Stage 'reward' didn't change, skipping" in proc.stdout and "python -m stages.reward_gate" in proc.stdout
    assert "python -m stages.reward " not in proc.stdout

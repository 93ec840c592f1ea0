"""Test helpers: a throw-away copy of the project with tiny sizes, run through the real CLI and real DVC."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Sizes small enough for a stage to run in seconds on 2 cores; the defaults stay in params.yaml.
TINY: dict[str, Any] = {
    "task": {
        "n_sft": 400,
        "n_sft_test": 60,
        "n_pairs": 300,
        "n_pairs_test": 100,
        "n_prompts": 64,
        "n_eval_prompts": 32,
    },
    "sft": {
        "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 320, "max_positions": 96},
        "epochs": 1,
        "batch_size": 32,
        "n_samples": 16,
        "max_new_tokens": 24,
        "logging_steps": 2,
    },
    "comparisons": {"replies_per_prompt": 4, "train_pairs": 150, "test_pairs": 60, "max_new_tokens": 24},
    "ppo": {"monitor_samples": 1},
    "evaluate": {"samples_per_prompt": 2, "best_of_n": [1, 2], "best_of_n_pool": 4},
    "reward": {
        "epochs": 1,
        "batch_size": 32,
        "n_norm_samples": 16,
        "max_new_tokens": 24,
        "logging_steps": 2,
        "offline_pairs": 150,
    },
}
OPEN_GATE = {  # any reward model passes
    "max_gap_to_ceiling": 1.0,
    "min_agreement": 0.0,
    "min_rank_agreement": -1.0,
    "min_on_policy_agreement": 0.0,
    "max_on_policy_gap": 1.0,
    "min_bon_gold_gain": -10.0,
}


OPEN_PROMOTE = {  # any policy is promoted: tests about the machinery, not about the model being better
    "min_win_rate_vs_sft": 0.0,
    "min_win_rate_vs_sft_ci_low": 0.0,
    "min_win_rate_vs_champion": 0.0,
    "max_kl": 1e9,
    "max_alignment_tax": 1e9,
    "block_on_overoptimisation": False,
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_project(dest: Path, overrides: dict[str, Any] | None = None, data: bool = True) -> Path:
    """Copy the project's pipeline files into `dest` (a fresh git repo), with tiny params and generated data."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    # The code is imported from the installed package; DVC hashes the stage files, so copy them too.
    shutil.copytree(ROOT / "stages", dest / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), deep_merge(TINY, overrides or {}))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # as in the repository's .gitignore: what the stages write beside the DVC-tracked outputs stays out of git commits
    (dest / ".gitignore").write_text(
        "/data\n/artifacts\n/reports\nmlflow.db\n/mlartifacts\n/mlruns/\n/checkpoints/\n*.promote.lock\n/.rlhf/\n"
    )
    run(["git", "init", "-q"], dest)
    if data:
        run([str(BIN / "rlhf"), "make-data"], dest)
        run([sys.executable, "-m", "dvc", "add", "-q", "data"], dest)
    return dest


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)  # each project copy keeps its own sqlite:///mlflow.db
    e.pop("RLHF_PARENT_RUN_ID", None)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def tiny_policy_and_rm(dest: Path) -> tuple[Path, Path]:
    """A randomly initialised 1-layer causal LM and the same backbone with a scalar head, saved as HF folders."""
    from transformers import AutoModelForSequenceClassification

    from stages.lib.modeling import TinyModelConfig, build_tiny_model, train_tokenizer

    tokenizer = train_tokenizer(["Human: hi Assistant: hello there"] * 4, 300)
    shape = TinyModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=300, max_positions=64, dropout=0.0)
    policy = build_tiny_model("gpt2", shape, tokenizer)
    policy.save_pretrained(dest / "policy")
    tokenizer.save_pretrained(dest / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(dest / "policy", num_labels=1)
    rm.save_pretrained(dest / "rm")
    tokenizer.save_pretrained(dest / "rm")
    return dest / "policy", dest / "rm"


def clear_schedules(deployment: str, cwd: Path, client_env: dict[str, str]) -> None:
    """A test's deployment runs when the test triggers it, not also at prefect.yaml's 03:00 UTC (a nightly run that
    fired mid-test once raced the test's own run in the same checkout)."""
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "schedule", "clear", deployment, "-y"],
        cwd=cwd,
        env=client_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr

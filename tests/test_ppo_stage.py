"""The PPO stage on a tiny project: exact resume after SIGKILL, the KL guard, the NaN guard, two processes.

The upstream stages run once through `rlhf run reward` (real DVC); PPO is then run directly as
`python -m stages.ppo` with a tiny `ppo` section, each test with its own checkpoint directory.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.lib.outcome import ExitCode
from tests.helpers import BIN, OPEN_GATE, ROOT, deep_merge, env, make_project, run

pytestmark = pytest.mark.slow

# threads 1: on a loaded 2-core machine torch's spinning worker threads made a run ~6x slower
TINY_PPO: dict[str, Any] = {
    "num_steps": 4,
    "batch_size": 8,
    "num_mini_batches": 2,
    "ppo_epochs": 2,
    "response_length": 12,
    "checkpoint_every": 1,
    "sample_every": 2,
    "n_monitor": 8,
    "threads": 1,
    "keep": "last",
}  # keep-best has its own test


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with PPO's upstream (validate, sft, reward, reward_gate) run by `rlhf run reward_gate`."""
    dest = make_project(tmp_path_factory.mktemp("ppo_proj"), {"reward_gate": OPEN_GATE})
    run([str(BIN / "rlhf"), "run", "reward_gate"], dest)
    return dest


def _params(project: Path, where: Path, **ppo_overrides: Any) -> Path:
    """A params file: the project's, with a tiny `ppo` section and its own checkpoint directory under `where`."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    own = {"checkpoint_dir": str(where / "checkpoints")}
    params["ppo"] = deep_merge(params["ppo"], {**TINY_PPO, **own, **ppo_overrides})  # nested sections key by key
    path = where / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _ppo_args(params: Path, out: Path) -> list[str]:
    return [
        "-m",
        "stages.ppo",
        "--params",
        str(params),
        "--data",
        "artifacts/validate/data",
        "--sft",
        "artifacts/sft/model",
        "--rm",
        "artifacts/reward/model",
        "--norm",
        "artifacts/reward/norm.json",
        "--gate",
        "artifacts/reward_gate/passed.json",
        "--out",
        str(out),
        "--no-tracking",
    ]


def _kl_rows(out: Path) -> list[dict[str, str]]:
    """kl.csv without the wall-clock columns."""
    with open(out / "kl.csv", newline="") as f:
        return [
            {k: v for k, v in row.items() if not k.startswith(("time/", "tokens/per_second"))}
            for row in csv.DictReader(f)
        ]


def test_resume_after_sigkill_is_exact(project, tmp_path):
    params = dict(num_steps=8)  # steps take ~0.1 s: leave room to kill after step 2 and before the end
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    run([sys.executable, *_ppo_args(_params(project, a, **params), a / "out")], project)

    args = [sys.executable, *_ppo_args(_params(project, b, **params), b / "out")]
    with open(b / "killed.log", "w") as log:
        proc = subprocess.Popen(args, cwd=project, env=env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        # keep_checkpoints prunes step_000002 once step_000004 is written: any checkpoint from step 2 on will do
        while not [p for p in (b / "checkpoints").glob("*/step_*/state.pt") if int(p.parent.name[5:]) >= 2]:
            assert proc.poll() is None, (b / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 2 within 300 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (b / "out" / "metrics.json").exists()  # killed before the end

    resumed = run(args, project)
    assert "resuming PPO from" in resumed.stdout + resumed.stderr

    for out in (a / "out", b / "out"):
        assert json.loads((out / "metrics.json").read_text())["outcome"] == "completed"
    # Exact, not close: RNG, optimiser, scheduler, KL controller and data position are all restored, and the same
    # CPU kernels with the same thread count are deterministic.
    wa, wb = load_file(a / "out/model/model.safetensors"), load_file(b / "out/model/model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    rows_a, rows_b = _kl_rows(a / "out"), _kl_rows(b / "out")
    assert len(rows_a) == params["num_steps"] and rows_a == rows_b


def test_kl_guard_stops_and_rolls_back(project, tmp_path):
    # SFT = reference at step 1 (KL ~0, within budget: the log-probs come from the generation's KV-cache logits and
    # the reference's from a full forward, equal up to float rounding); a large learning rate makes step 2's KL large.
    guard = {"max_kl": 1e-3, "patience": 1}
    config = _params(project, tmp_path, num_steps=6, learning_rate=1e-3, kl_guard=guard)
    proc = run([sys.executable, *_ppo_args(config, tmp_path / "out")], project, check=False)
    assert proc.returncode == ExitCode.GATE, proc.stderr[-3000:]
    assert "stopped by the KL guard" in proc.stderr and "objective/kl" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr

    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["outcome"] == "stopped_by_kl_guard" and "objective/kl" in metrics["reason"]
    assert metrics["kept_step"] < metrics["steps_done"] <= 6  # a within-budget checkpoint
    assert f"kept step {metrics['kept_step']}" in metrics["reason"]
    # The saved policy is the rolled-back checkpoint's, not the over-budget last step's.
    (state_path,) = (tmp_path / "checkpoints").glob(f"*/step_{metrics['kept_step']:06d}/state.pt")
    policy = {
        k.removeprefix("policy."): v
        for k, v in torch.load(state_path, weights_only=True)["model"].items()
        if k.startswith("policy.")
    }
    # GPT-2 ties lm_head to wte: save_pretrained may leave lm_head.weight out
    saved = load_file(tmp_path / "out/model/model.safetensors")
    assert saved and set(saved) <= set(policy)
    assert all(torch.equal(saved[k], policy[k]) for k in saved)


def test_nonfinite_loss_exits_cleanly(project, tmp_path):
    # One Adam step of size ~1e6 per weight: the next minibatch's logits (hence the loss) are inf/nan.
    config = _params(project, tmp_path, learning_rate=1e6)
    proc = run([sys.executable, *_ppo_args(config, tmp_path / "out")], project, check=False)
    assert proc.returncode == ExitCode.NONFINITE, proc.stderr[-3000:]
    assert "PPO stopped" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert list((tmp_path / "checkpoints").glob("*/step_000000/state.pt"))  # the SFT policy, intact
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate(project, tmp_path):
    config = _params(project, tmp_path, num_steps=2)
    # The shipped CPU config: accelerate's `--cpu` flag alone would use its single-process launcher whatever
    # --num_processes says; this config selects torchrun, and the stage's Accelerator(cpu=True) runs DDP over gloo.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "docker/accelerate/multi_cpu.yaml"),
        "--main_process_port",
        str(_free_port()),
    ]
    run([*launch, *_ppo_args(config, tmp_path / "out")], project)

    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["outcome"] == "completed" and metrics["steps_done"] == 2
    assert (tmp_path / "out/model/model.safetensors").exists()
    (state_path,) = (tmp_path / "checkpoints").glob("*/step_000002/state.pt")
    # one RNG state per process: two processes really ran
    assert len(torch.load(state_path, weights_only=True)["rng"]) == 2


def test_lora_policy_uses_its_frozen_base_as_reference(project, tmp_path):
    config = _params(project, tmp_path, num_steps=2, lora={"enabled": True, "r": 4, "alpha": 8})
    run([sys.executable, *_ppo_args(config, tmp_path / "out")], project)
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["outcome"] == "completed"
    # step 1 starts at the reference (LoRA's B is zero-initialised): KL 0 from the adapter-disabled base, up to the
    # float rounding between the generation's KV-cache logits (the policy's log-probs) and a full forward (~1e-6)
    first = _kl_rows(tmp_path / "out")[0]
    assert abs(float(first["objective/kl"])) < 1e-4
    saved = load_file(tmp_path / "out/model/model.safetensors")
    assert not any("lora" in k for k in saved)  # merged into a plain model that loads like the SFT one
    sft = load_file(project / "artifacts/sft/model/model.safetensors")
    assert saved.keys() <= sft.keys() and any(not torch.equal(saved[k], sft[k]) for k in saved)
    # checkpoints keep only what trains: the frozen base is the SFT model the run starts from
    (state_path,) = (tmp_path / "checkpoints").glob("*/step_000002/state.pt")
    kept = torch.load(state_path, weights_only=True)["model"]
    assert kept and all("lora_" in k for k in kept)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.ppo import load_trained_state

    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(project / "artifacts/sft/model"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
    )
    with pytest.raises(RuntimeError, match="lacks trained weights"):  # a checkpoint missing an adapter is refused
        load_trained_state(policy, {}, lora=True)


def test_speedups_keep_the_math():
    """The fused GELU is gelu_new's function, and the generation's logits are a full forward's (left padding too)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import GELUTanh, NewGELUActivation

    from stages.lib import rl_math as pm
    from stages.lib.modeling import fuse_gelu, position_ids

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=63,
        eos_token_id=63,
        pad_token_id=62,
    )
    model = GPT2LMHeadModel(config).eval()
    queries = torch.randint(0, 62, (4, 10))
    with torch.no_grad():
        before = model(queries).logits
        fuse_gelu(model)
        after = model(queries).logits
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert any(isinstance(m, GELUTanh) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)

    qmask = torch.ones_like(queries)
    qmask[0, :4], qmask[2, :7] = 0, 0  # left padding
    queries = queries.masked_fill(qmask == 0, 62)
    with torch.no_grad():
        out = model.generate(
            input_ids=queries,
            attention_mask=qmask,
            max_new_tokens=8,
            do_sample=True,
            temperature=0.7,
            top_k=5,
            pad_token_id=62,
            eos_token_id=63,
            return_dict_in_generate=True,
            output_logits=True,
        )
        responses = out.sequences[:, 10:]
        seq, attn = out.sequences, torch.cat([qmask, torch.ones_like(responses)], 1)
        forward = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).logits[:, 9:-1]
    # raw logits (before temperature and top-k), so the log-probs are of the full softmax, as the update computes them
    from_generation = pm.logprobs_from_logits(torch.stack(out.logits, 1), responses, 0.7)
    assert torch.allclose(from_generation, pm.logprobs_from_logits(forward, responses, 0.7), atol=1e-5)
    # the update's and the reference's forward keep only the responses' logits (the lm_head skips the prompt)
    from stages.ppo import PolicyAndValue

    with torch.no_grad():
        kept, _ = PolicyAndValue(model, None)(seq, attn, position_ids(attn), responses.shape[1] + 1)
    assert kept.shape[1] == responses.shape[1] + 1
    assert torch.allclose(kept[:, :-1], forward, atol=1e-5)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_critic_free_estimators_train_without_a_value_model(project, tmp_path, estimator):
    """RLOO, GRPO and REINFORCE++: same loop, KL guard, checkpoints and metrics, no critic at all."""
    config = _params(project, tmp_path, num_steps=2, estimator=estimator, group_size=4, learning_rate=1e-4)
    run([sys.executable, *_ppo_args(config, tmp_path / "out")], project)
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["outcome"] == "completed" and metrics["estimator"] == estimator
    (state_path,) = (tmp_path / "checkpoints").glob("*/step_000002/state.pt")
    weights = torch.load(state_path, weights_only=True)["model"]
    assert weights and not any(k.startswith("critic") for k in weights)  # one model less
    rows = _kl_rows(tmp_path / "out")
    assert len(rows) == 2 and float(rows[0]["val/var_explained"]) == 0.0 and float(rows[0]["loss/value_avg"]) == 0.0
    saved = load_file(tmp_path / "out/model/model.safetensors")
    sft = load_file(project / "artifacts/sft/model/model.safetensors")
    if metrics["kept_step"]:  # the policy moved
        assert any(not torch.equal(saved[k], sft[k]) for k in saved)


def test_keep_best_follows_the_noise_rule_and_never_prunes_the_best(project, tmp_path):
    """keep: best outputs the checkpoint `best_checkpoint` names from the monitor's per-prompt scores (the best one
    only when it leads the last step beyond noise), and that checkpoint was never pruned."""
    from stages.ppo import best_checkpoint

    config = _params(project, tmp_path, num_steps=4, learning_rate=3e-4, keep="best", keep_z=0.0, monitor_samples=2)
    run([sys.executable, *_ppo_args(config, tmp_path / "out")], project)
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    (last_state,) = (tmp_path / "checkpoints").glob("*/step_000004/state.pt")
    monitor = torch.load(last_state, weights_only=True)["state"]["monitor"]
    assert len(monitor) == 5 and all(len(m["judge_by_prompt"]) == 8 for m in monitor)
    expected, why = best_checkpoint(monitor, 4, "the last step", 0.0)
    assert metrics["kept_step"] == expected and metrics["kept_because"] == why
    with open(tmp_path / "out/monitor.csv", newline="") as f:
        assert [int(m["kept"]) for m in csv.DictReader(f)] == [int(m["step"] == expected) for m in monitor]
    (state_path,) = (tmp_path / "checkpoints").glob(f"*/step_{metrics['kept_step']:06d}/state.pt")  # never pruned
    policy = {
        k.removeprefix("policy."): v
        for k, v in torch.load(state_path, weights_only=True)["model"].items()
        if k.startswith("policy.")
    }
    saved = load_file(tmp_path / "out/model/model.safetensors")
    assert all(torch.equal(saved[k], policy[k]) for k in saved)


def test_the_gold_reward_benchmark_trains_on_the_gold_judges_scores(project, tmp_path):
    """benchmarks/gold_reward_ppo.py (the measured limit in docs/results.md) is the PPO stage with each rollout scored
    by the gold judge, normalised on SFT's replies: the scores PPO trained on are the judge's, not the RM's."""
    from stages.lib import gold

    config = _params(project, tmp_path, num_steps=2, estimator="rloo", group_size=4)
    args = _ppo_args(config, tmp_path / "out")[2:]  # without "-m stages.ppo"
    run([sys.executable, str(ROOT / "benchmarks/gold_reward_ppo.py"), *args], project)
    norm = json.loads((tmp_path / "out/gold_norm.json").read_text())
    assert norm["n"] > 0 and norm["std"] > 0
    penalty = yaml.safe_load(config.read_text())["ppo"]["missing_eos_penalty"]
    samples = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:
        z = (gold.gold_score(s["prompt"], s["response"]) - norm["mean"]) / norm["std"]
        assert min(abs(s["score"] - z), abs(s["score"] - (z - penalty))) < 1e-4, (s, z)

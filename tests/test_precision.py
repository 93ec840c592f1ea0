"""Precision per device (params.yaml `precision`): fp32 on every CPU unless bf16 is asked for where it is native."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from stages import sft
from stages.lib import modeling
from stages.lib.io import write_jsonl
from stages.lib.modeling import PrecisionError, cpu_has_native_bf16, resolve_precision, trainer_precision
from stages.lib.params import ParamsError, defaults
from stages.lib.tracking import NullTracker

AMD_FLAGS = "flags : fpu sse sse2 avx avx2 fma bmi2 sha_ni"  # an AMD EPYC without AVX-512: no native bf16
INTEL_FLAGS = "flags : fpu sse avx2 avx512f avx512bw avx512_bf16 amx_tile"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not cpu_has_native_bf16(AMD_FLAGS)
    assert cpu_has_native_bf16(INTEL_FLAGS)
    assert cpu_has_native_bf16("flags : amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : avx512f avx512bw")  # AVX-512 alone does not compute bf16


@pytest.mark.parametrize("native", [False, True])
def test_auto_and_fp32_are_fp32_on_every_cpu(native):
    assert resolve_precision("auto", "cpu", native_bf16=native) == "fp32"
    assert resolve_precision("fp32", "cpu", native_bf16=native) == "fp32"


def test_bf16_on_a_cpu_only_where_native():
    assert resolve_precision("bf16", "cpu", native_bf16=True) == "bf16"
    with pytest.raises(PrecisionError, match="no native bf16.*12x slower"):
        resolve_precision("bf16", "cpu", native_bf16=False)
    with pytest.raises(PrecisionError, match="needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ParamsError, match="precision must be one of"):  # a params error: one line, exit as bad params
        resolve_precision("half", "cpu")


def test_trl_configs_get_the_precision_explicitly():
    """TRL's SFTConfig and RewardConfig default to bf16=True: fp32 must turn it off."""
    from trl import RewardConfig, SFTConfig

    for cls in (SFTConfig, RewardConfig):
        assert cls(output_dir="/tmp/unused", use_cpu=True).bf16 is True  # the trap this guards against
        args = cls(output_dir="/tmp/unused", use_cpu=True, **trainer_precision("fp32"))
        assert args.bf16 is False and args.fp16 is False


@contextlib.contextmanager
def _record_autocast(seen: list[bool]):
    """Every module forward in the block records whether CPU autocast was on."""
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(torch.is_autocast_enabled("cpu"))
    )
    try:
        yield
    finally:
        hook.remove()


def _tiny_sft(tmp_path: Path, precision: str) -> list[bool]:
    data = tmp_path / "data"
    rows = [
        {"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:", "response": f"{a} plus {b} is {a + b}."}
        for a in range(6)
        for b in range(6)
    ]
    write_jsonl(data / "sft.jsonl", rows[:30])
    write_jsonl(data / "sft_test.jsonl", rows[30:])
    config = defaults(
        sft.SFTConfig,
        tiny={"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 300, "max_positions": 64},
        epochs=1,
        batch_size=8,
        n_samples=2,
        max_new_tokens=4,
        logging_steps=1,
    )
    seen: list[bool] = []
    with _record_autocast(seen):
        sft.run(config, data, tmp_path / "out", NullTracker(), precision)
    return seen


@pytest.mark.slow
def test_no_stage_trains_under_bf16_autocast_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    """On a CPU without native bf16 (an AMD EPYC's flags), `precision: auto` trains SFT with no autocast at all."""
    monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda cpuinfo=None: cpu_has_native_bf16(AMD_FLAGS))
    precision = resolve_precision("auto")
    assert precision == "fp32"
    seen = _tiny_sft(tmp_path, precision)
    assert seen and not any(seen)


@pytest.mark.slow
def test_the_autocast_probe_sees_bf16_when_it_is_asked_for(tmp_path):
    """The probe above can fail: with bf16 the same training runs its forwards under autocast."""
    seen = _tiny_sft(tmp_path, "bf16")
    assert any(seen)


def _tiny_rollout(batch: int = 4, prompt: int = 6, reply: int = 5):
    """A tiny GPT-2 policy and one rollout of it (old log-probs from its own forward), as ppo_epochs receives them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from stages.lib import rl_math as pm
    from stages.lib.modeling import position_ids
    from stages.ppo import PolicyAndValue, Rollout, Scored

    torch.manual_seed(0)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # ppo_epochs puts the model in train mode
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, eos_token_id=63, **no_dropout)
    model = PolicyAndValue(GPT2LMHeadModel(config), None)
    seq = torch.randint(0, 62, (batch, prompt + reply))
    attn = torch.ones_like(seq)
    responses, mask = seq[:, prompt:], torch.ones(batch, reply)
    ro = Rollout([""] * batch, responses, mask, torch.ones(batch), seq, attn, position_ids(attn), prompt, None)

    def logprobs() -> torch.Tensor:
        with torch.no_grad():
            logits, _ = model(seq, attn, ro.pos, ro.logits_kept)
        return pm.logprobs_from_logits(logits[:, :-1].float(), responses, 1.0)

    zeros = torch.zeros(batch, reply)
    return model, ro, logprobs, lambda old: Scored(old, old, zeros, torch.zeros(batch), torch.zeros(batch), None)


def test_ppo_updates_reach_the_forward_under_a_run_long_autocast():
    """PPO runs its whole loop inside one autocast block (stages/ppo.py main), and autocast caches each weight's bf16
    copy until that block ends: without dropping the cache after each optimizer step, every later forward (the next
    minibatch, the next rollout) would still compute with the first weights while the fp32 weights moved."""
    from accelerate import Accelerator

    from stages.ppo import PPOConfig, ppo_epochs

    model, ro, logprobs, scored = _tiny_rollout()
    config = defaults(PPOConfig, ppo_epochs=2, num_mini_batches=1, temperature=1.0, estimator="rloo", ent_coef=0.0)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    advantages = torch.randn(ro.mask.shape, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old = logprobs()
        stats = ppo_epochs(
            model, optimizer, accelerator, ro, scored(old), advantages, advantages, config, torch.Generator(), 1
        )
        inside = logprobs()
    assert stats["approxkl"][0] < 1e-4  # the first minibatch: the weights the rollout was sampled with
    assert stats["approxkl"][1] > 1e-3  # the second sees the first step's update
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = logprobs()  # a new autocast block casts the current weights
    assert not torch.allclose(inside, old, atol=1e-3)
    assert torch.allclose(inside, fresh)


def test_a_stage_process_starts_with_the_tuned_allocator():
    """`python -m stages.<name>` restarts itself with GLIBC_TUNABLES before importing torch (stages/lib/allocator.py);
    a value the user set is kept, and importing `stages` anywhere else (a test, a notebook) restarts nothing."""
    import os
    import subprocess
    import sys

    from stages.lib.allocator import TUNABLES
    from tests.helpers import ROOT

    as_module = "import os, sys; sys.argv[:1] = ['-m']; import stages; print(os.environ.get('GLIBC_TUNABLES'))"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": str(ROOT)}

    def started(extra: dict[str, str]) -> str:
        done = subprocess.run([sys.executable, "-c", as_module], env=env | extra, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert started({}) == TUNABLES
    assert started({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == "glibc.malloc.arena_max=2"
    as_import = "import os, stages; print(os.environ.get('GLIBC_TUNABLES'))"  # not a stage's start: no restart
    assert subprocess.run([sys.executable, "-c", as_import], env=env, capture_output=True, text=True).stdout == "None\n"

"""params.yaml `device`: resolved once per stage, and no stage forces the CPU when a GPU is visible.

This machine has no GPU, so the GPU cases make torch *report* one (`torch.cuda.is_available`) and record where each
stage's loaders would put a model (`Module.to`), instead of moving it; benchmarks/gpu_check.sh runs the real thing on
a GPU machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from stages.lib import modeling
from stages.lib.params import ParamsError
from tests.helpers import ROOT


@pytest.fixture
def restore_device():
    yield
    modeling._device = "cpu"  # the module-level choice `use_hardware` makes for a stage process


@pytest.fixture
def gpu_visible(monkeypatch, restore_device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    placed: list[str] = []

    def record_to(self, *args, **kwargs):  # where the model would go; it stays on the CPU here
        device = args[0] if args else kwargs.get("device")
        placed.append(str(device))
        return self

    monkeypatch.setattr(torch.nn.Module, "to", record_to)
    return placed


def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused(restore_device):
    assert not torch.cuda.is_available()
    assert modeling.resolve_device("auto") == "cpu"
    assert modeling.resolve_device("cpu") == "cpu"
    with pytest.raises(ParamsError, match="device cuda asked for, but torch sees no CUDA GPU"):
        modeling.resolve_device("cuda")
    with pytest.raises(ParamsError, match="device must be one of auto, cpu, cuda"):
        modeling.resolve_device("tpu")
    hardware = modeling.use_hardware({"device": "auto", "precision": "auto"})
    assert hardware == modeling.Hardware("cpu", "fp32") and modeling.current_device() == torch.device("cpu")
    assert modeling.trainer_device(hardware.device) == {"use_cpu": True}
    with pytest.raises(ParamsError, match="params.yaml has no `device`"):
        modeling.use_hardware({"precision": "auto"})


def test_auto_takes_a_visible_gpu_in_bf16_and_each_process_its_own(gpu_visible, monkeypatch):
    hardware = modeling.use_hardware({"device": "auto", "precision": "auto"})
    assert hardware == modeling.Hardware("cuda", "bf16")
    assert modeling.trainer_device(hardware.device) == {"use_cpu": False}  # HF/TRL trainers then take the GPU
    assert modeling.current_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # accelerate launch / torchrun: one process per GPU
    assert modeling.current_device() == torch.device("cuda", 3)
    assert modeling.use_hardware({"device": "cpu", "precision": "auto"}) == modeling.Hardware("cpu", "fp32")


def test_every_stage_loader_puts_its_model_on_the_gpu(gpu_visible, tmp_path):
    """The policy and reference (SFT, comparisons, DPO, PPO, evaluation, promotion, serving) and the reward models
    (PPO, evaluation, the judge) load through these two functions; with a GPU visible both place on it."""
    from stages.lib.rewards import RewardModel
    from tests.helpers import tiny_policy_and_rm

    policy_dir, rm_dir = tiny_policy_and_rm(tmp_path)
    modeling.use_hardware({"device": "auto", "precision": "fp32"})
    gpu_visible.clear()
    modeling.load_causal_lm(policy_dir)
    RewardModel.load(rm_dir)
    assert gpu_visible == ["cuda:0", "cuda:0"]


def test_ppo_gives_accelerate_the_gpu(gpu_visible, tmp_path):
    from stages import ppo

    modeling.use_hardware({"device": "auto", "precision": "fp32"})
    assert ppo.accelerator_options() == {"cpu": False}
    modeling.use_hardware({"device": "cpu", "precision": "fp32"})
    assert ppo.accelerator_options() == {"cpu": True}


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def test_no_stage_forces_the_cpu():
    """No `cpu=True` / `use_cpu=True` in stages/ or flows/, and every TRL/HF trainer config a stage builds takes its
    device from `trainer_device` (the one resolution)."""
    configs = 0
    for path in [*ROOT.glob("stages/**/*.py"), *ROOT.glob("flows/**/*.py")]:
        for call in _calls(path):
            for kw in call.keywords:
                assert not (
                    kw.arg in ("cpu", "use_cpu") and isinstance(kw.value, ast.Constant) and kw.value.value is True
                ), f"{path.relative_to(ROOT)}:{call.lineno} forces the CPU"
            name = getattr(call.func, "id", getattr(call.func, "attr", ""))
            if name.startswith("Trl") and name.endswith("Config") or name == "TrainingArguments":
                configs += 1
                spread = [kw.value for kw in call.keywords if kw.arg is None]
                assert any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "trainer_device" for v in spread), (
                    f"{path.relative_to(ROOT)}:{call.lineno} builds {name} without trainer_device(...)"
                )
    assert configs >= 3  # SFT, the reward models, DPO

"""stages.lib.params: every config section is checked by type and range when params.yaml is read, and a wrong value is
one line naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from stages import dpo, evaluate, ppo, promote, reward_gate, sft, validate
from stages.lib import modeling, task
from stages.lib.judge import JudgeConfig
from stages.lib.outcome import ExitCode
from stages.lib.params import AT_LEAST_ONE, POSITIVE, Allowed, ParamsError, config_from
from stages.lib.reward_training import RewardConfig
from stages.lib.splits import SplitConfig

CONFIGS = [
    task.TaskConfig,
    task.FlawRates,
    validate.ValidateConfig,
    validate.DatasetSpec,
    SplitConfig,
    sft.SFTConfig,
    modeling.TinyModelConfig,
    modeling.LoraSettings,
    RewardConfig,
    JudgeConfig,
    reward_gate.GateConfig,
    ppo.PPOConfig,
    ppo.KLGuardConfig,
    evaluate.EvaluateConfig,
    promote.PromoteConfig,
    dpo.DPOConfig,
]


def _numeric_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def _wrong_values(cls: type) -> list[tuple[str, object, str]]:
    """(field, value, why) for every ranged field: a string always; a negative and a zero where the range says so."""
    cases = []
    for key, allowed in cls.RANGES.items():
        cases.append((key, "lots", "a string"))
        if allowed.choices:
            continue
        if allowed.low is not None and allowed.low >= 0:
            cases.append((key, -1, "a negative"))
        if allowed.low is not None and (allowed.low > 0 or allowed.low_open):
            cases.append((key, 0, "a zero"))
    return cases


CASES = [(cls, key, value, why) for cls in CONFIGS for key, value, why in _wrong_values(cls)]


@pytest.mark.parametrize(("cls", "key", "value", "why"), CASES, ids=[f"{c.__name__}.{k}={v!r}" for c, k, v, _ in CASES])
def test_every_config_refuses_a_wrong_value_in_one_line(cls: type, key: str, value: object, why: str) -> None:
    with pytest.raises(ParamsError) as info:
        config_from(cls, {key: value}, at="section")
    message = str(info.value)
    assert message.startswith(f"section.{key} = {value!r}: expected "), message
    assert "\n" not in message and len(message) < 300


def test_every_number_in_every_config_has_a_range() -> None:
    """A numeric field added without a range fails here (its wrong values would pass silently)."""
    missing = [
        f"{cls.__name__}.{name}"
        for cls in CONFIGS
        for name in _numeric_fields(cls)
        if name not in getattr(cls, "RANGES", {})
    ]
    assert not missing


def test_the_default_params_pass(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for cls in (
        task.TaskConfig,
        validate.ValidateConfig,
        sft.SFTConfig,
        RewardConfig,
        JudgeConfig,
        reward_gate.GateConfig,
        ppo.PPOConfig,
        evaluate.EvaluateConfig,
        promote.PromoteConfig,
    ):
        config_from(cls, params[cls.SECTION])


@pytest.mark.parametrize(
    ("cls", "section", "message"),
    [
        (
            validate.ValidateConfig,
            {"max_invalid_fraction": "0.5"},
            "validate.max_invalid_fraction = '0.5': expected a number in [0, 1]",
        ),
        (
            validate.ValidateConfig,
            {"max_prompt_chars": "lots"},
            "validate.max_prompt_chars = 'lots': expected an integer >= 1",
        ),
        (validate.ValidateConfig, {"max_rows": 2.5}, "validate.max_rows = 2.5: expected an integer >= 1"),
        (validate.ValidateConfig, {"unique_kinds": ["prefs"]}, "validate.unique_kinds = ['prefs']: expected one of"),
        (
            validate.ValidateConfig,
            {"split": {"heldout_fraction": 1}},
            "validate.split.heldout_fraction = 1: expected in (0, 1)",
        ),
        (validate.ValidateConfig, {"split": 0.1}, "validate.split = 0.1: expected a mapping of"),
        (sft.SFTConfig, {"learning_rate": -1e-3}, "sft.learning_rate = -0.001: expected > 0"),
        (sft.SFTConfig, {"learning_rate": "1e-3"}, "sft.learning_rate = '1e-3': expected a number > 0"),
        (sft.SFTConfig, {"epochs": -1}, "sft.epochs = -1: expected > 0"),
        (sft.SFTConfig, {"batch_size": 0}, "sft.batch_size = 0: expected >= 1"),
        (sft.SFTConfig, {"gradient_checkpointing": "no"}, "sft.gradient_checkpointing = 'no': expected true or false"),
        (sft.SFTConfig, {"tiny": {"n_layer": 0}}, "sft.tiny.n_layer = 0: expected >= 1"),
        (sft.SFTConfig, {"lora": {"dropout": 1.0}}, "sft.lora.dropout = 1.0: expected in [0, 1)"),
        (sft.SFTConfig, {"tiny": {"n_layers": 2}}, "sft.tiny: unknown parameter(s) n_layers"),
        (RewardConfig, {"learning_rate": 0}, "reward.learning_rate = 0: expected > 0"),
        (RewardConfig, {"batch_size": True}, "reward.batch_size = True: expected an integer >= 1"),  # bool is no int
        (ppo.PPOConfig, {"kl_guard": {"max_kl": -1}}, "ppo.kl_guard.max_kl = -1: expected > 0"),
        (ppo.PPOConfig, {"gamma": 1.5}, "ppo.gamma = 1.5: expected in [0, 1]"),
        (ppo.PPOConfig, {"resume": "always"}, "ppo.resume = 'always': expected one of 'auto', 'never'"),
        (ppo.PPOConfig, {"learning_rate": float("nan")}, "ppo.learning_rate = nan: expected > 0"),
        (JudgeConfig, {"fraction": 1}, "judge.fraction = 1: expected in (0, 1)"),
        (
            reward_gate.GateConfig,
            {"min_rank_agreement": -2},
            "reward_gate.min_rank_agreement = -2: expected in [-1, 1]",
        ),
        (promote.PromoteConfig, {"registered_model": " "}, "promote: promote.registered_model must name"),
        (task.TaskConfig, {"kind_weights": {"fact": 1}}, "task: task.kind_weights must give a weight to each of"),
        (task.TaskConfig, {"sft_flaws": {"rude": 2}}, "task.sft_flaws.rude = 2: expected in [0, 1]"),
        (evaluate.EvaluateConfig, [1, 2], "evaluate = [1, 2]: expected a mapping of n_prompts"),
    ],
)
def test_messages_name_the_key_the_value_and_what_is_allowed(cls: type, section: object, message: str) -> None:
    with pytest.raises(ParamsError) as info:
        config_from(cls, section)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)


def test_an_int_is_a_float_but_nothing_else_is() -> None:
    assert config_from(sft.SFTConfig, {"learning_rate": 1, "epochs": 2}).learning_rate == 1
    assert config_from(ppo.PPOConfig, {"kl_guard": {"max_kl": 5}}).kl_guard == {"max_kl": 5}
    assert config_from(validate.ValidateConfig, {"unique_kinds": ["sft"]}).unique_kinds == ["sft"]


def test_allowed_describes_itself() -> None:
    assert str(POSITIVE) == "> 0" and str(AT_LEAST_ONE) == ">= 1"
    assert str(Allowed(0, 1, high_open=True)) == "in [0, 1)" and not Allowed(0, 1).allows(float("inf"))


def test_a_stage_with_a_string_where_a_number_belongs_exits_bad_input(tmp_path: Path, root: Path) -> None:
    """The issue's case: `validate.max_invalid_fraction: "0.5"` was a TypeError traceback."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["validate"]["max_invalid_fraction"] = "0.5"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.validate", "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == ExitCode.BAD_INPUT and "Traceback" not in proc.stderr
    assert "validate.max_invalid_fraction = '0.5': expected a number in [0, 1]" in proc.stderr
    report = (tmp_path / "reports/validate/report.md").read_text()  # the failure replaces any previous report
    assert report.startswith("Validation FAILED: validate.max_invalid_fraction = '0.5'")

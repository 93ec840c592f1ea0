"""stages.lib.params: every config section is checked by type and range when params.yaml is read, and a wrong value is
one line naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

import stages
from stages import evaluate, ppo, promote, reward_gate, sft, validate
from stages.lib import task
from stages.lib.judge import JudgeConfig
from stages.lib.outcome import ExitCode
from stages.lib.params import (
    AT_LEAST_ONE,
    POSITIVE,
    PROJECT_PARAMS,
    Allowed,
    ParamsError,
    config_from,
    defaults,
    load_params,
    nested,
    section,
    value,
)
from stages.lib.reward_training import RewardConfig


def _config_classes() -> dict[str, type]:
    """Every config dataclass in stages/, found by walking the package (no hand-kept list): the top-level ones by
    their SECTION, the nested ones by where a parent holds them, `data`'s entries as data.*; any other dataclass that
    declares RANGES (a config class without a place in params.yaml) under its own name."""
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(stages.__path__, "stages.")]
    found: dict[str, type] = {}
    for module in modules:
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__ and hasattr(obj, "SECTION"):
                found[obj.SECTION] = obj
    todo = list(found.items())
    while todo:
        where, cls = todo.pop()
        for key, child in nested(cls).items():
            if f"{where}.{key}" not in found:
                found[f"{where}.{key}"] = child
                todo.append((f"{where}.{key}", child))
    from stages.validate import DatasetSpec

    found["data.*"] = DatasetSpec
    placed = set(found.values())
    for module in modules:
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and hasattr(obj, "RANGES") and obj not in placed:
                found[obj.__name__] = obj  # a config class params.yaml does not reach: the test below names it
    return found


CLASSES = _config_classes()
CONFIGS = sorted(set(CLASSES.values()), key=lambda c: c.__name__)


def test_every_config_class_has_its_place_in_params_yaml() -> None:
    """Each config class reads a section params.yaml has, and each section of params.yaml is some class's."""
    params = load_params(PROJECT_PARAMS)
    unplaced = [name for name in CLASSES if name != "data.*" and section(params, name) is None]
    assert not unplaced, f"config classes with no section in params.yaml: {unplaced}"
    tops = {name.split(".")[0] for name in CLASSES}
    assert set(params) - tops == {"precision", "device"}, set(params) - tops  # one word each: modeling.use_hardware


def test_no_value_lives_in_two_places() -> None:
    """The config dataclasses hold no values (params.yaml does): no field has a default. The one exception is the
    optional keys of a `data` entry (a user's file list, not a hyperparameter), whose defaults params.yaml then never
    repeats."""
    with_defaults = {
        f"{where}.{f.name}": f.default
        for where, cls in CLASSES.items()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    assert set(with_defaults) == {"data.*.format", "data.*.heldout", "data.*.drops"}, sorted(with_defaults)
    for name, entry in load_params(PROJECT_PARAMS)["data"].items():
        for key in ("format", "heldout", "drops"):
            assert entry.get(key, not with_defaults[f"data.*.{key}"]) != with_defaults[f"data.*.{key}"], (
                f"params.yaml data.{name}.{key} repeats the default {with_defaults[f'data.*.{key}']!r}"
            )


def test_a_value_changed_in_params_yaml_is_the_value_the_stage_uses(tmp_path: Path) -> None:
    """The data generator (the cheapest stage) with task.n_sft and task.labels_per_pair changed in params.yaml."""
    params = load_params(PROJECT_PARAMS)
    params["task"] |= {"n_sft": 7, "n_sft_test": 5, "n_pairs": 9, "n_pairs_test": 11, "n_prompts": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.lib.task", "--params", "params.yaml", "--out", "data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    counts = {p.name: len(p.read_text().splitlines()) for p in (tmp_path / "data").glob("*.jsonl")}
    assert counts | {"eval_prompts.jsonl": 0} == {
        "sft.jsonl": 7,
        "sft_test.jsonl": 5,
        "preferences.jsonl": 9,
        "preferences_test.jsonl": 11,
        "prompts.jsonl": 3,
        "eval_prompts.jsonl": 0,
    }


def test_a_missing_key_is_named() -> None:
    params = load_params(PROJECT_PARAMS)["ppo"]
    del params["kl_coef"]
    with pytest.raises(ParamsError, match=r"^ppo: missing parameter\(s\) kl_coef \(params.yaml is their only home\)"):
        config_from(stages.ppo.PPOConfig, params)


def test_one_value_of_another_stages_section_is_read_by_its_dotted_key() -> None:
    params = load_params(PROJECT_PARAMS)
    assert value(params, "ppo.ensemble_penalty") == params["ppo"]["ensemble_penalty"]
    assert value(params, "ppo.kl_guard.max_kl") == params["ppo"]["kl_guard"]["max_kl"]
    del params["ppo"]["ensemble_penalty"]  # an older params.yaml: named, not a KeyError's traceback
    with pytest.raises(ParamsError, match=r"^missing parameter ppo.ensemble_penalty \(params.yaml is its only home\)"):
        value(params, "ppo.ensemble_penalty")


def test_defaults_are_the_projects_params_with_overrides_merged_key_by_key() -> None:
    from stages.ppo import PPOConfig

    config = defaults(PPOConfig, num_steps=3, kl_guard={"max_kl": 5.0})
    ppo = load_params(PROJECT_PARAMS)["ppo"]
    assert config.num_steps == 3 and config.kl_coef == ppo["kl_coef"]
    assert config.kl_guard.max_kl == 5.0 and config.kl_guard.patience == ppo["kl_guard"]["patience"]


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


def _complete(cls: type) -> dict:
    """A complete section for `cls` from the project's params.yaml (the first place that holds it)."""
    params = load_params(PROJECT_PARAMS)
    where = next(name for name, c in CLASSES.items() if c is cls)
    if where == "data.*":
        return {"path": "x.jsonl", "kind": "sft"}
    return section(params, where)


def _with(cls: type, given: dict) -> dict:
    """A complete section with `given` in it (a nested section's keys merged in, any other value replaced)."""
    complete, sections = _complete(cls), nested(cls)
    return complete | {k: complete[k] | v if k in sections and isinstance(v, dict) else v for k, v in given.items()}


CASES = [(cls, key, value, why) for cls in CONFIGS for key, value, why in _wrong_values(cls)]


@pytest.mark.parametrize(("cls", "key", "value", "why"), CASES, ids=[f"{c.__name__}.{k}={v!r}" for c, k, v, _ in CASES])
def test_every_config_refuses_a_wrong_value_in_one_line(cls: type, key: str, value: object, why: str) -> None:
    with pytest.raises(ParamsError) as info:
        config_from(cls, {**_complete(cls), key: value}, at="section")
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


def test_the_default_params_pass() -> None:
    params = load_params(PROJECT_PARAMS)
    for where, cls in CLASSES.items():
        entries = params["data"].values() if where == "data.*" else [section(params, where)]
        for entry in entries:
            config_from(cls, entry, at=where)


@pytest.mark.parametrize(
    ("cls", "given", "message"),
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
def test_messages_name_the_key_the_value_and_what_is_allowed(cls: type, given: object, message: str) -> None:
    with pytest.raises(ParamsError) as info:
        config_from(cls, given if not isinstance(given, dict) else _with(cls, given))
    assert str(info.value).startswith(message), str(info.value)


def test_an_int_is_a_float_but_nothing_else_is() -> None:
    assert defaults(sft.SFTConfig, learning_rate=1, epochs=2).learning_rate == 1
    assert defaults(ppo.PPOConfig, kl_guard={"max_kl": 5}).kl_guard.max_kl == 5
    assert defaults(validate.ValidateConfig, unique_kinds=["sft"]).unique_kinds == ["sft"]


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

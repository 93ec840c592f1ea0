"""Contracts between dvc.yaml, params.yaml, the stage configs and the CLI: one home for each fact."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from stages import evaluate, ppo, promote, reward, sft, task, validate
from stages.params import config_from, load_params
from tests.conftest import ROOT

CONFIGS = {"task": task.TaskConfig, "validate": validate.ValidateConfig, "sft": sft.SFTConfig,
           "reward": reward.RewardConfig, "ppo": ppo.PPOConfig, "evaluate": evaluate.EvaluateConfig,
           "promote": promote.PromoteConfig}  # fmt: skip
NESTED = {("reward", "gate"): reward.GateConfig, ("ppo", "kl_guard"): ppo.KLGuardConfig}


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_params_section_builds_its_config():
    params = load_params(ROOT / "params.yaml")
    for section, cls in CONFIGS.items():
        config_from(cls, params[section])
    for (section, key), cls in NESTED.items():
        config_from(cls, params[section][key])
    for spec in params["data"].values():
        config_from(validate.DatasetSpec, spec)


def test_unknown_parameter_is_an_error():
    with pytest.raises(ValueError, match="unknown parameter"):
        config_from(ppo.PPOConfig, {"kl_coeff": 0.1})


def test_dvc_stages_read_existing_params_and_run_their_module():
    params = load_params(ROOT / "params.yaml")
    for name, stage in _dvc_stages().items():
        for section in stage.get("params", []):
            assert section in params, f"dvc.yaml stage {name} reads params section {section!r} that does not exist"
        assert stage["cmd"] == f"python -m stages.{name}", name
        assert (ROOT / "stages" / f"{name}.py").exists()
        assert f"stages/{name}.py" in stage["deps"], f"{name} must depend on its own code"


def test_every_stage_with_a_config_is_in_the_dag():
    stages = set(_dvc_stages())
    assert {"validate", "sft", "reward", "ppo", "evaluate", "promote"} <= stages
    # every section but the data generator's (data.dvc pins its output) belongs to a stage of the DAG
    assert set(CONFIGS) - {"task"} <= stages


def test_cli_help_is_fast_and_helpful():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("run", "validate", "make-data"):
        assert word in out.stdout
    out = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--help"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert "--kind" in out.stdout and "hh" in out.stdout

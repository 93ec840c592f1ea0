"""Profiles (flows/profiles.py): an overlay of params.yaml written into it the way `dvc exp run -S` would."""

from __future__ import annotations

import shutil

import pytest
import yaml

from flows import profiles
from stages.lib.params import ParamsError, load_params
from tests.helpers import ROOT


@pytest.fixture
def project(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    return tmp_path


def test_the_real_profile_changes_only_its_keys_and_keeps_the_comments(project):
    before = (project / "params.yaml").read_text()
    changed = profiles.apply(project, "real")
    after = (project / "params.yaml").read_text()
    assert "sft.model: tiny-gpt2 -> smollm2-135m-instruct" in changed
    assert "sft.lora.enabled: False -> True" in changed
    assert not any(c.startswith("profile") for c in changed)  # the profile's own section is not a params key
    # every comment line of params.yaml is still there, in order
    assert [line for line in before.splitlines() if line.lstrip().startswith("#")] == [
        line for line in after.splitlines() if line.lstrip().startswith("#")
    ]
    params, overlay = load_params(project / "params.yaml"), yaml.safe_load((ROOT / "profiles/real.yaml").read_text())
    assert params["data"] == overlay["data"]  # replaced whole: the default task's six datasets are gone
    assert params["sft"]["lora"]["target_modules"] == yaml.safe_load(before)["sft"]["lora"]["target_modules"]
    assert params["ppo"]["kl_coef"] == yaml.safe_load(before)["ppo"]["kl_coef"]  # what the profile leaves alone
    assert profiles.apply(project, "real") == []  # applied: nothing more to change
    assert (project / "params.yaml").read_text() == after


def test_a_small_float_stays_a_number_for_the_yaml_reader_the_stages_use(project):
    (project / "profiles/lr.yaml").write_text("ppo: {learning_rate: 0.00005, kl_coef: 1.0e-3, cliprange: 1.0e+9}\n")
    profiles.apply(project, "lr")
    ppo = load_params(project / "params.yaml")["ppo"]
    assert (ppo["learning_rate"], ppo["kl_coef"], ppo["cliprange"]) == (0.00005, 0.001, 1e9)


def test_the_profiles_data_is_where_its_params_point(project):
    n, out = profiles.dialogues(project, "real")
    assert n > 0 and out == yaml.safe_load((ROOT / "profiles/real.yaml").read_text())["data"]["preferences"]["path"]


def test_a_wrong_profile_is_a_clear_error(project):
    with pytest.raises(ParamsError, match="no profile 'nope'.*profiles here: real"):
        profiles.apply(project, "nope")
    (project / "profiles/bad.yaml").write_text("sfft: {epochs: 1}\n")
    with pytest.raises(ParamsError, match="profile key 'sfft' is not a section of params.yaml"):
        profiles.apply(project, "bad")
    (project / "profiles/list.yaml").write_text("- a\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        profiles.apply(project, "list")
    with pytest.raises(ParamsError, match="makes no data"):
        profiles.dialogues(project, "bad")


def test_make_data_writes_the_profiles_dialogues(project, monkeypatch):
    from flows.cli import main
    from stages.lib.io import read_jsonl

    monkeypatch.chdir(project)
    assert main(["make-data", "--profile", "real"]) == 0
    n, out = profiles.dialogues(project, "real")
    rows = read_jsonl(project / out)
    assert len(rows) == n and sum("\n\nAssistant:" in r["chosen"] for r in rows) > 0.95 * n  # ~2% broken on purpose

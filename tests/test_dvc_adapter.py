"""The fence around DVC's private internals (flows/dvc_adapter.py): it fails loudly here when DVC changes them.

The local runner swaps `dvc.stage.run.cmd_run` and calls `prepare_kwargs`, `_make_cmd` and `get_executable`. None of
them is DVC's public API. These tests pin what the adapter relies on, so upgrading DVC (constraints.txt) without
adapting it fails in CI with a message that says what moved, instead of misbehaving in a pipeline run.
"""

from __future__ import annotations

import inspect
import sys

import dvc
import pytest
import yaml
from dvc.stage import run as dvc_run

from flows import dvc_adapter
from flows.orchestrate import stage_env
from flows.runners import Runner
from tests.helpers import run


def test_the_installed_dvc_is_one_the_adapter_was_tested_with():
    assert dvc.__version__ in dvc_adapter.TESTED, (
        f"DVC {dvc.__version__} is not in flows/dvc_adapter.py TESTED {dvc_adapter.TESTED}: run tests/test_runners.py "
        "and this file; if they pass add the version, else adapt _run_commands (README: Upgrading DVC)"
    )
    assert dvc_adapter.supported() is None


def test_the_private_functions_have_the_signatures_the_adapter_calls():
    params = {
        name: list(inspect.signature(getattr(dvc_run, name)).parameters)
        for name in ("cmd_run", "prepare_kwargs", "_make_cmd", "get_executable")
    }
    assert params["cmd_run"][:3] == ["stage", "dry", "run_env"], params
    assert params["prepare_kwargs"][:2] == ["stage", "run_env"], params
    assert params["_make_cmd"][:2] == ["executable", "cmd"], params
    assert params["get_executable"] == [], params
    # DVC calls cmd_run through the module attribute (so swapping it takes effect) when it runs a stage
    assert "cmd_run" in inspect.getsource(dvc_run.run_stage)


def test_an_unsupported_version_falls_back_to_a_process_of_its_own(tmp_path, monkeypatch):
    """On a DVC the adapter was not tested with, the local runner says so and runs `dvc repro` as a process."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "in.txt").write_text("x")
    stage = {"cmd": "python -c \"open('out.txt', 'w').write('y')\"", "deps": ["in.txt"], "outs": ["out.txt"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], project)
    monkeypatch.setattr(dvc_adapter, "TESTED", ("0.0.0",))
    assert "tested with DVC 0.0.0" in dvc_adapter.supported()
    lines: list[str] = []
    result = Runner("local").reproduce(project, "s", stage_env(), lines.append)
    assert result.status == "ran" and (project / "out.txt").read_text() == "y"
    assert any(
        line.startswith("note: running s as a process of its own: flows/dvc_adapter.py was tested") for line in lines
    )
    assert any(line.startswith("$ ") and "dvc repro --single-item s" in line for line in lines)


@pytest.mark.parametrize("missing", ["prepare_kwargs", "_make_cmd"])
def test_a_moved_internal_is_named(monkeypatch, missing):
    monkeypatch.delattr(dvc_run, missing)
    assert dvc_adapter.supported() == f"dvc.stage.run lacks {missing}"

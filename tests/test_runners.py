"""The local runner (flows/runners.py, flows/dvc_adapter.py, flows/inprocess.py): `dvc repro --single-item` through
DVC's API with the stage's `python -m` command in this process.

A toy DVC project (real `dvc`, no mocks) whose stage is a small module: it runs in the test's own process, DVC records
it exactly as `dvc repro` would, the process is left as it was, and failures, skips, the run cache, shell commands and a
held lock come out as they do with `dvc repro`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flows import inprocess
from flows.runners import Runner
from tests.helpers import ROOT, run

PROBE = """\
import json, os, sys
from pathlib import Path

print("probe running", flush=True)
print("probe to stderr", file=sys.stderr)
where = {"pid": os.getpid(), "cwd": os.getcwd(), "stage": os.environ.get("DVC_STAGE"),
         "root": os.environ.get("DVC_ROOT"), "marker": os.environ.get("PROBE_MARKER")}
Path("where.json").write_text(json.dumps(where))  # not an output: where and how it ran
Path("out").mkdir(exist_ok=True)
Path("out/seen.json").write_text(json.dumps({"argv": sys.argv[1:], "input": Path("in.txt").read_text()}))
import logging
lib = logging.getLogger("probe_lib")  # a library's logger: its handler keeps the sys.stderr of its first import
if not lib.handlers:
    lib.addHandler(logging.StreamHandler())
lib.warning("probe lib says %s", Path("in.txt").read_text())
import torch
torch.set_num_threads(1)
os.environ["PROBE_LEAK"] = "1"
if sys.argv[1] == "gate":
    sys.exit(2)
if sys.argv[1] == "crash":
    raise RuntimeError("probe crashed on purpose")
"""


LOCAL = Runner("local")


def _project(dest: Path, mode: str = "ok", cmd: str | None = None) -> Path:
    dest.mkdir(parents=True)
    (dest / "in.txt").write_text("one")
    (dest / "probe.py").write_text(PROBE)
    stage = {"cmd": cmd or f"python -m probe {mode}", "deps": ["in.txt", "probe.py"], "outs": ["out"]}
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": stage}}, sort_keys=False))
    run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], dest)
    return dest


def _lock(project: Path) -> dict:
    path = project / "dvc.lock"
    return yaml.safe_load(path.read_text())["stages"] if path.exists() else {}


def _dvc_status(project: Path) -> dict:
    return json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)


def _process_state() -> tuple:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, set per test phase
    return env, os.getcwd(), sys.argv[:], sys.path[:], torch.get_num_threads()


@pytest.fixture
def state() -> tuple:
    """The process state a stage could leave changed, to compare after it."""
    return _process_state()


def _unchanged(before: tuple) -> None:
    assert _process_state() == before


def test_python_module_stage_runs_in_this_process_and_dvc_records_it(tmp_path, state):
    project = _project(tmp_path / "inproc")
    twin = shutil.copytree(project, tmp_path / "twin")  # the same project, for a plain `dvc repro`
    lines: list[str] = []

    outcome = LOCAL.reproduce(project, "probe", {"PROBE_MARKER": "m"}, lines.append)
    assert outcome.status == "ran", lines
    where = json.loads((project / "where.json").read_text())
    assert where == {"pid": os.getpid(), "cwd": str(project), "stage": "probe", "root": str(project), "marker": "m"}
    assert json.loads((project / "out/seen.json").read_text()) == {"argv": ["ok"], "input": "one"}
    assert "probe running" in lines and "probe to stderr" in lines  # the stage's output, both streams
    _unchanged(state)  # cwd, environment (PROBE_LEAK), argv, sys.path, torch threads: as before
    assert _dvc_status(project) == {}

    # what DVC wrote is what `dvc repro` writes for the same project
    run([sys.executable, "-m", "dvc", "repro", "--single-item", "probe"], twin, check=True)
    assert json.loads((twin / "where.json").read_text())["pid"] != os.getpid()
    mine, theirs = _lock(project)["probe"], _lock(twin)["probe"]
    assert mine["deps"] == theirs["deps"] and mine["cmd"] == theirs["cmd"]
    assert [o["md5"] for o in mine["outs"]] == [o["md5"] for o in theirs["outs"]]


def test_unchanged_stage_is_skipped_and_a_reverted_change_is_restored_from_the_run_cache(tmp_path, state):
    project = _project(tmp_path / "p")
    assert LOCAL.reproduce(project, "probe", {}, print).status == "ran"
    lines: list[str] = []
    assert LOCAL.reproduce(project, "probe", {}, lines.append).status == "skipped"
    assert "Stage 'probe' didn't change, skipping" in lines and "probe running" not in lines

    (project / "in.txt").write_text("two")
    lines.clear()
    assert LOCAL.reproduce(project, "probe", {}, lines.append).status == "ran"
    assert json.loads((project / "out/seen.json").read_text())["input"] == "two"
    assert "probe lib says two" in lines  # the handler made in an earlier run logs to this run's output

    (project / "in.txt").write_text("one")  # back: DVC's run cache has this one, as `dvc repro` would find
    lines.clear()
    assert LOCAL.reproduce(project, "probe", {}, lines.append).status == "restored"
    assert "probe running" not in lines and json.loads((project / "out/seen.json").read_text())["input"] == "one"
    assert _dvc_status(project) == {}
    _unchanged(state)


@pytest.mark.parametrize(
    "mode, code, printed",
    [
        ("gate", 2, ["probe running"]),  # a gate: exit 2 after its report
        (
            "crash",
            1,
            ["Traceback (most recent call last):", "RuntimeError: probe crashed on purpose"],
        ),  # with its traceback
    ],
)
def test_a_failing_stage_fails_with_its_code_and_output_and_records_nothing(tmp_path, state, mode, code, printed):
    project = _project(tmp_path / mode, mode)
    outcome = LOCAL.reproduce(project, "probe", {}, print)
    assert (outcome.status, outcome.code) == ("failed", code)  # no outcome file (not a stage_main): the exit code
    assert all(line in outcome.tail for line in printed), outcome.tail
    assert _lock(project) == {} and "probe" in _dvc_status(project)
    _unchanged(state)


def test_a_shell_command_runs_as_dvc_runs_it(tmp_path, state):
    project = _project(tmp_path / "s", cmd="echo said-by-shell && mkdir -p out && echo $DVC_STAGE > out/stage.txt")
    lines: list[str] = []
    assert LOCAL.reproduce(project, "probe", {}, lines.append).status == "ran"
    assert "said-by-shell" in lines and (project / "out/stage.txt").read_text() == "probe\n"
    assert _dvc_status(project) == {}
    _unchanged(state)


def test_a_missing_output_is_dvcs_error_not_a_crash(tmp_path):
    project = _project(tmp_path / "m", cmd="echo nothing written")
    outcome = LOCAL.reproduce(project, "probe", {}, print)
    assert outcome.status == "failed" and "does not exist" in outcome.reason


def test_a_held_lock_is_busy(tmp_path):
    import zc.lockfile

    project = _project(tmp_path / "b")
    (project / ".dvc/tmp").mkdir(exist_ok=True)
    lock = zc.lockfile.LockFile(str(project / ".dvc/tmp/lock"))  # what a concurrent `dvc repro` holds
    try:
        assert LOCAL.reproduce(project, "probe", {}, print).status == "busy"
    finally:
        lock.close()
    assert not (project / "where.json").exists()


HELLO = """\
import json, os, pathlib
import stages
from stages.hello_value import VALUE
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/hello.json").write_text(json.dumps({"value": VALUE}))
pathlib.Path("where.json").write_text(json.dumps({"pid": os.getpid(), "package": stages.__file__}))
"""


def test_the_projects_own_code_runs_fresh_and_the_callers_modules_are_put_back(tmp_path, state):
    """`python -m stages.X` imports the project's stages/ (what DVC hashes), as `python -m` in its directory would,
    also when this process has another checkout's `stages` loaded or the project's code changed since it was loaded."""
    import stages  # this checkout's, loaded by the test process

    project = _project(tmp_path / "own", cmd="python -m stages.hello")
    shutil.copytree(ROOT / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "stages/hello.py").write_text(HELLO)
    (project / "stages/hello_value.py").write_text('VALUE = "one"\n')
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["probe"]["deps"] = ["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec))

    lines: list[str] = []
    assert LOCAL.reproduce(project, "probe", {}, lines.append).status == "ran", lines
    where = json.loads((project / "where.json").read_text())
    assert where == {"pid": os.getpid(), "package": str(project / "stages/__init__.py")}
    assert json.loads((project / "out/hello.json").read_text()) == {"value": "one"}
    assert sys.modules["stages"] is stages and "stages.hello_value" not in sys.modules

    (project / "stages/hello_value.py").write_text('VALUE = "two"\n')  # edited between two runs of this process
    assert LOCAL.reproduce(project, "probe", {}, print).status == "ran"
    assert json.loads((project / "out/hello.json").read_text()) == {"value": "two"}  # not the module loaded before
    assert _dvc_status(project) == {}
    _unchanged(state)


def test_python_module_pattern():
    assert inprocess.python_module("python -m stages.sft") == ["stages.sft"]
    assert inprocess.python_module("python3 -m stages.evaluate --out artifacts/x") == [
        "stages.evaluate",
        "--out",
        "artifacts/x",
    ]
    for shell in (
        "python -m stages.sft > log.txt",
        "python -m a && python -m b",
        "python -m a $X",
        "python x.py",
        "python -c 'print(1)'",
        "python -m a | tee b",
    ):
        assert inprocess.python_module(shell) is None, shell

"""Contracts between dvc.yaml, params.yaml, the stage configs, the code's imports and the CLI: one home for each fact.

- dvc.yaml is the one home of a stage's inputs: every path its command passes is a dep (inputs) or an out (outputs),
  every path-valued option of the stage has its value in the command, and `deps` covers the stage's import closure
  (computed here with `ast`), so editing any module a stage imports makes `dvc status` name that stage.
- Three floors: a stage imports only the library (`stages.lib`), never another stage; the library never imports a
  stage or `flows`; `flows` is on top, with no import circle.
"""

from __future__ import annotations

import ast
import importlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import sync
from stages.lib.params import load_params
from tests.conftest import ROOT

NOT_TRACKED = set(sync.NOT_TRACKED)


def _dvc_stages(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def _paths(entries: list | None) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    return sync.import_closure(module, root)


def _imports(path: Path) -> set[str]:
    return sync._runs(path, ROOT)


def _path_defaults(module_file: Path) -> dict[str, str]:
    """The stage's argparse options whose default is a path (they name files the stage reads or writes)."""
    out = {}
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            flag = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            value = default.value if isinstance(default, ast.Constant) else None
            if isinstance(flag, str) and isinstance(value, str) and "/" in value:
                out[flag] = value
    return out


def test_dvc_yaml_is_what_rlhf_sync_writes_byte_for_byte():
    """`rlhf sync` on this unchanged tree rewrites dvc.yaml to exactly the bytes that are there."""
    assert sync.synced(ROOT) == (ROOT / "dvc.yaml").read_text()
    assert sync.changes(ROOT) == []


def test_sync_follows_an_import_a_stage_gains(tmp_path):
    """A stage that starts importing a module gets it as a dep from `rlhf sync`, and `--check` says so first."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "stages/lib/newmod.py").write_text("X = 1\n")
    gate = tmp_path / "stages/reward_gate.py"
    gate.write_text(
        gate.read_text().replace(
            "from __future__ import annotations\n",
            "from __future__ import annotations\n\nimport stages.lib.newmod  # noqa: F401\n",
            1,
        )
    )
    assert sync.changes(tmp_path) == ["reward_gate: deps +stages/lib/newmod.py"]
    sync.sync(tmp_path)
    assert "stages/lib/newmod.py" in _dvc_stages(tmp_path)["reward_gate"]["deps"]
    assert sync.changes(tmp_path) == []


def test_sync_passes_a_data_file_outside_data_to_validate(tmp_path):
    """A data file params.yaml names outside data/ becomes a --data option and a dep of the validate stage."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["preferences"]["path"] = "team/prefs.jsonl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sync.sync(tmp_path)
    validate = _dvc_stages(tmp_path)["validate"]
    assert sync.options(validate["cmd"])[:2] == [("--data", "data"), ("--data", "team/prefs.jsonl")]
    assert _paths(validate["deps"])[:2] == ["data", "team/prefs.jsonl"]


def test_every_stage_runs_its_module_and_reads_existing_params():
    params = load_params(ROOT / "params.yaml")
    for name, stage in _dvc_stages().items():
        assert shlex.split(stage["cmd"])[:3] == ["python", "-m", f"stages.{sync.base_name(name)}"], name
        for key in stage.get("params", []):  # a section, or one key in it (DVC's dotted form: ppo.ensemble_penalty)
            value = params
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"dvc.yaml stage {name} reads {key!r}: no such param"
                value = value[part]
        module = importlib.import_module(f"stages.{sync.base_name(name)}")
        own = {
            c.SECTION.split(".")[0]
            for c in vars(module).values()
            if isinstance(c, type) and c.__module__ == module.__name__ and hasattr(c, "SECTION")
        }
        assert own <= set(stage.get("params", [])), f"{name} must list its own params section(s) {sorted(own)}"


@pytest.mark.parametrize("name", list(_dvc_stages()))
def test_deps_cover_the_import_closure(name):
    """Editing any module a stage imports must make `dvc status` name the stage."""
    deps = set(_paths(_dvc_stages()[name]["deps"]))
    missing = import_closure(f"stages.{sync.base_name(name)}") - deps
    assert not missing, f"dvc.yaml stage {name} imports {sorted(missing)} but does not depend on them"


@pytest.mark.parametrize("name", list(_dvc_stages()))
def test_the_command_names_every_path_and_dvc_tracks_them(name):
    stage = _dvc_stages()[name]
    pairs = sync.options(stage["cmd"])
    options = dict(pairs)
    deps = set(_paths(stage["deps"]))
    written = set(_paths(stage.get("outs"))) | set(_paths(stage.get("metrics")))
    for flag, path in pairs:
        if flag in NOT_TRACKED or flag in sync.NOT_PATHS:
            continue
        if flag in sync.OUTPUT_OPTIONS:  # an output folder or file: DVC tracks what the stage writes there
            assert any(w == path or w.startswith(path.rstrip("/") + "/") for w in written), (name, flag, path)
        else:
            assert path in deps, f"{name} reads {path} ({flag}) but does not depend on it"
    # a path the stage would otherwise take from its own default is a path dvc.yaml does not know about
    hidden = set(_path_defaults(ROOT / "stages" / f"{name}.py")) - set(options) - {"--params"}
    assert not hidden, f"{name}: give {sorted(hidden)} in dvc.yaml's cmd, where the stage's paths live"
    data_deps = [d for d in deps if not d.startswith("stages/")]
    assert set(data_deps) <= {v for _, v in pairs}, f"{name} depends on paths its command never passes"


def test_the_closure_contract_fails_when_a_dep_is_removed(tmp_path):
    """The check above is not vacuous: drop one imported module from a copy of dvc.yaml and it fails."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    spec["stages"]["ppo"]["deps"].remove("stages/lib/modeling.py")
    deps = set(_paths(spec["stages"]["ppo"]["deps"]))
    assert import_closure("stages.ppo") - deps == {"stages/lib/modeling.py"}


def _top(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def test_three_floors():
    """Stages import only the library; the library never imports a stage or flows; flows import no circle."""
    stage_files = [p for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"]
    for path in stage_files:
        for module in _imports(path):
            assert module.startswith("stages.lib"), f"{path.name} imports {module}: stages import only stages.lib"
    for path in (ROOT / "stages/lib").glob("*.py"):
        for module in _imports(path):
            assert module.startswith("stages.lib"), f"lib/{path.name} imports {module}"
    graph = {_top(p): {m for m in _imports(p) if m.startswith("flows")} for p in (ROOT / "flows").glob("*.py")}

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    circles = [m for m in graph if reaches(m, m)]
    assert not circles, f"import circle through {circles}"


def test_cli_help_is_helpful_and_imports_no_heavy_library():
    """`rlhf --help` answers at once: building the parser imports none of torch, transformers, mlflow, prefect."""
    probe = (
        "import sys, flows.cli; flows.cli.build_parser(); "
        "print(sorted({'torch', 'transformers', 'mlflow', 'prefect', 'great_expectations'} & set(sys.modules)))"
    )
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]", heavy
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("run", "validate", "make-data", "exit codes"):
        assert word in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", "--help"], capture_output=True, text=True, check=True
    )
    assert "--kind" in out.stdout and "hh" in out.stdout


def test_no_function_runs_past_a_screen_without_a_reason():
    """A function in stages/ or flows/ longer than 80 lines says why in a `# long:` comment on its first lines."""
    too_long = []
    for path in [*ROOT.glob("stages/**/*.py"), *ROOT.glob("flows/*.py")]:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                head = "\n".join(lines[node.lineno - 1 : node.lineno + 4])
                if "# long:" not in head:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long, too_long


def test_rounds_are_stages_rlhf_sync_writes_and_takes_back(tmp_path):
    """comparisons.rounds: 2 adds round 2's four stages (on round 1's policy, trained on both rounds' comparisons)
    before evaluate, which then reads round 2's policy; back to 1, dvc.yaml is byte for byte what it was."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["comparisons"]["rounds"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sync.sync(tmp_path)
    stages = _dvc_stages(tmp_path)
    names = list(stages)
    assert names[names.index("ppo") + 1 : names.index("evaluate")] == [
        "comparisons_r2",
        "reward_r2",
        "reward_gate_r2",
        "ppo_r2",
    ]
    opts = {n: sync.options(stages[n]["cmd"]) for n in names}
    assert ("--policy", "artifacts/ppo/model") in opts["comparisons_r2"] and ("--round", "2") in opts["comparisons_r2"]
    assert "2" not in stages["comparisons_r2"]["deps"]  # a round number is not a path DVC could hash
    assert [v for k, v in opts["reward_r2"] if k == "--comparisons"] == [
        "artifacts/comparisons",
        "artifacts/comparisons_r2",
    ]
    assert ("--start", "artifacts/ppo/model") in opts["ppo_r2"] and ("--rm", "artifacts/reward_r2/model") in opts[
        "ppo_r2"
    ]
    assert ("--gate", "artifacts/reward_gate_r2/passed.json") in opts["ppo_r2"]
    assert ("--policy", "artifacts/ppo_r2/model") in opts["evaluate"] and (
        "--policy",
        "artifacts/ppo_r2/model",
    ) in opts["promote"]
    assert "artifacts/ppo_r2/model" in stages["evaluate"]["deps"] and "stages/ppo.py" in stages["ppo_r2"]["deps"]
    assert [v for k, v in opts["evaluate"] if k == "--round-ppo"] == [
        "artifacts/ppo/metrics.json",
        "artifacts/ppo_r2/metrics.json",
    ]
    from flows.orchestrate import plan

    assert plan(tmp_path, ["ppo_r2"])[-4:] == ["comparisons_r2", "reward_r2", "reward_gate_r2", "ppo_r2"]
    params["comparisons"]["rounds"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sync.sync(tmp_path)
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()

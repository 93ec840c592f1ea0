"""The pipeline through the real `dvc` CLI on one tiny throw-away git project.

One module-scoped chain of fixtures mutates the project, each step once and in this order:

    fresh      `dvc repro` on a fresh project (every stage runs); metrics and plots are read here
    second     a second `dvc repro` (nothing runs)
    committed  `git commit` of the finished project (dvc.lock included)
    seed       ppo.seed changed in params.yaml: `dvc status`, `dvc repro`, `dvc metrics diff HEAD`,
               `dvc params diff HEAD`
    experiment the seed change committed, then `dvc exp run -S ppo.kl_coef=0.2` and `dvc exp show --json`

Each fixture records what its commands printed, so a test reads the state of its own step whatever ran after
it.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, make_project, run
from tests.test_contracts import import_closure

pytestmark = pytest.mark.slow

# Tiny sizes (helpers.TINY does task/sft/reward); gates and promotion criteria that a 2-step PPO passes.
OVERRIDES: dict[str, Any] = {
    "reward_gate": OPEN_GATE,
    "ppo": {
        "num_steps": 2,
        "batch_size": 8,
        "ppo_epochs": 1,
        "response_length": 16,
        "n_monitor": 4,
        "checkpoint_every": 1,
        "threads": 1,
        "keep": "last",
    },  # a ppo param must change the policy (never step 0)
    "evaluate": {"n_prompts": 8, "max_new_tokens": 16},
    "promote": OPEN_PROMOTE,
}
UPSTREAM = {"validate", "sft", "reward", "reward_gate"}  # what a ppo parameter must never rerun
RAN = re.compile(r"^Running stage '([^']+)'", re.M)
SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping$", re.M)


def dvc(project: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], project).stdout


def git(project: Path, *args: str) -> str:
    ident = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return run(["git", *ident, *args], project).stdout


def spec(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "dvc.yaml").read_text())


def stages(project: Path) -> list[str]:
    return list(spec(project)["stages"])


def paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml outs/metrics/plots list (entries are `path` or `{path: options}`)."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def downstream(project: Path, stage: str) -> set[str]:
    """`stage` and every stage that depends, transitively, on one of its outputs (from dvc.yaml)."""
    st = spec(project)["stages"]
    outs = {n: set(paths(s.get("outs")) + paths(s.get("metrics")) + paths(s.get("plots"))) for n, s in st.items()}
    found, grew = {stage}, True
    while grew:
        produced = set().union(*(outs[f] for f in found))
        new = {n for n, s in st.items() if n not in found and set(paths(s.get("deps"))) & produced}
        found, grew = found | new, bool(new)
    return found


def lock(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def mtimes(project: Path) -> dict[str, int]:
    files = (p for p in (project / "artifacts").rglob("*") if p.is_file())
    return {str(p.relative_to(project)): p.stat().st_mtime_ns for p in files}


def set_param(project: Path, section: str, key: str, value: Any) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as `a.b: value`, numbers, strings and booleans only (DVC drops nulls and lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, int | float | str):
            out[prefix + k] = v
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open() as f:
            return list(csv.DictReader(f))
    rows = json.loads(path.read_text())
    assert isinstance(rows, list), path
    return rows


@dataclass
class Repro:
    out: str  # stdout + stderr of `dvc repro`
    lock_before: bytes
    lock_after: bytes
    mtimes_before: dict[str, int]
    mtimes_after: dict[str, int]

    @property
    def ran(self) -> list[str]:
        return RAN.findall(self.out)

    @property
    def skipped(self) -> list[str]:
        return SKIPPED.findall(self.out)


def repro(project: Path, *args: str) -> Repro:
    lock_file = project / "dvc.lock"
    before = lock_file.read_bytes() if lock_file.exists() else b""
    mt = mtimes(project) if (project / "artifacts").exists() else {}
    proc = run([str(BIN / "dvc"), *(args or ("repro",))], project)
    return Repro(proc.stdout + proc.stderr, before, lock_file.read_bytes(), mt, mtimes(project))


# ---------------------------------------------------------------------------------------------------------------------
# The fixture chain
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("dvc_proj"), OVERRIDES)


@pytest.fixture(scope="module")
def fresh(project) -> dict[str, Any]:
    """`dvc repro` on the fresh project, then its status, metrics and plots (read-only)."""
    assert not (project / "dvc.lock").exists() and not (project / "artifacts").exists()
    first = repro(project)
    plots_dir = project.parent / "plots_html"
    metric_files = [f for s in spec(project)["stages"].values() for f in paths(s.get("metrics"))]
    return {
        "repro": first,
        "metric_files": {f: json.loads((project / f).read_text()) for f in metric_files},
        "plot_files": {f: _read_rows(project / f) for d in spec(project)["plots"] for f in next(iter(d.values()))["y"]},
        "status_json": json.loads(dvc(project, "status", "--json")),
        "status": dvc(project, "status"),
        "metrics": json.loads(dvc(project, "metrics", "show", "--json")),
        "plots": json.loads(dvc(project, "plots", "show", "--json")),
        "plots_html": (dvc(project, "plots", "show", "-o", str(plots_dir)), plots_dir),
    }


@pytest.fixture(scope="module")
def second(fresh, project) -> Repro:
    return repro(project)


@pytest.fixture(scope="module")
def committed(second, project) -> str:
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "tiny pipeline, first run")
    assert git(project, "status", "--porcelain") == "", "the finished project is not fully committed"
    return git(project, "rev-parse", "HEAD").strip()


@pytest.fixture(scope="module")
def seed(committed, project) -> dict[str, Any]:
    """ppo.seed changed in the workspace: what DVC says changed, the rerun, and the diffs against HEAD."""
    old = yaml.safe_load((project / "params.yaml").read_text())["ppo"]["seed"]
    set_param(project, "ppo", "seed", old + 1)
    status = json.loads(dvc(project, "status", "--json"))
    lock_before = lock(project)
    rerun = repro(project)
    diff = run([str(BIN / "dvc"), "metrics", "diff", "HEAD", "--json"], project)
    return {
        "old": old,
        "status": status,
        "lock_before": lock_before,
        "lock_after": lock(project),
        "repro": rerun,
        "status_after": json.loads(dvc(project, "status", "--json")),
        "metrics_diff": json.loads(diff.stdout),
        "metrics_diff_stderr": diff.stderr,
        "params_diff": json.loads(dvc(project, "params", "diff", "HEAD", "--json")),
    }


@pytest.fixture(scope="module")
def experiment(seed, project) -> dict[str, Any]:
    """The seed change committed, then `dvc exp run -S ppo.kl_coef=0.2` and `dvc exp show --json`."""
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "ppo.seed changed")
    baseline = git(project, "rev-parse", "HEAD").strip()
    lock_before = lock(project)
    proc = run([str(BIN / "dvc"), "exp", "run", "-S", "ppo.kl_coef=0.2"], project)
    return {
        "baseline": baseline,
        "lock_before": lock_before,
        "lock_after": lock(project),
        "out": proc.stdout + proc.stderr,
        "show": json.loads(dvc(project, "exp", "show", "--json")),
    }


# ---------------------------------------------------------------------------------------------------------------------
# 1. A fresh project: every stage runs
# ---------------------------------------------------------------------------------------------------------------------


def test_repro_runs_every_stage(fresh, project):
    first, all_stages = fresh["repro"], stages(project)
    assert first.ran == all_stages, first.out[-3000:]  # each stage once, in dvc.yaml order (it is topological)
    assert first.skipped == []
    assert set(lock(project)) == set(all_stages)
    for name, stage in spec(project)["stages"].items():
        produced = paths(stage.get("outs")) + paths(stage.get("metrics")) + paths(stage.get("plots"))
        assert produced, f"{name} declares no output"
        assert all((project / p).exists() for p in produced), [p for p in produced if not (project / p).exists()]
        recorded = {o["path"] for o in lock(project)[name].get("outs", [])}
        assert recorded == set(produced), name  # dvc.lock holds a hash for each of them
    assert fresh["status_json"] == {}
    assert "Data and pipelines are up to date." in fresh["status"]


# ---------------------------------------------------------------------------------------------------------------------
# 2. A second repro does nothing
# ---------------------------------------------------------------------------------------------------------------------


def test_second_repro_is_a_no_op(second, project):
    assert second.ran == [] and "Running stage" not in second.out, second.out[-3000:]
    assert second.skipped == stages(project)
    assert "Data and pipelines are up to date." in second.out
    assert second.lock_after == second.lock_before  # byte for byte
    assert any(p.startswith("artifacts/ppo/model/") for p in second.mtimes_before)
    assert second.mtimes_after == second.mtimes_before  # no output rewritten, not even with the same bytes


@pytest.mark.parametrize("module", ["stages/lib/modeling.py", "stages/lib/rewards.py", "stages/lib/rl_math.py"])
def test_editing_a_shared_module_makes_dvc_status_name_every_stage_that_imports_it(second, project, module):
    """dvc.yaml's deps cover each stage's imports: `dvc status` is never blind to a change in the library."""
    users = {name for name in stages(project) if module in import_closure(f"stages.{name}", project)}
    assert users and users != set(stages(project))  # a real selection, not everything or nothing
    path = project / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        assert set(json.loads(dvc(project, "status", "--json"))) == users
    finally:
        path.write_bytes(original)
    assert json.loads(dvc(project, "status", "--json")) == {}


# ---------------------------------------------------------------------------------------------------------------------
# 3. One PPO parameter changed: exactly PPO and what follows it rerun
# ---------------------------------------------------------------------------------------------------------------------


def test_ppo_param_change_reruns_only_ppo_and_downstream(seed, project):
    after_ppo = downstream(project, "ppo")
    assert {"ppo", "evaluate", "promote"} <= after_ppo and not after_ppo & UPSTREAM

    # dvc status names only ppo, for the reason that its params section changed (what follows is implied by it)
    assert seed["status"] == {"ppo": [{"changed deps": {"params.yaml": {"ppo": "modified"}}}]}

    rerun = seed["repro"]
    assert rerun.ran == [s for s in stages(project) if s in after_ppo], rerun.out[-3000:]
    assert rerun.skipped == [s for s in stages(project) if s not in after_ppo]
    before, after = seed["lock_before"], seed["lock_after"]
    for name in UPSTREAM:
        assert after[name] == before[name], f"{name}'s dvc.lock entry changed"
        assert all(
            rerun.mtimes_after[p] == t for p, t in rerun.mtimes_before.items() if p.startswith(f"artifacts/{name}/")
        )
    assert after["ppo"]["params"]["params.yaml"]["ppo"]["seed"] == seed["old"] + 1
    assert after["ppo"]["outs"] != before["ppo"]["outs"]  # another seed, another policy
    assert seed["status_after"] == {}


# ---------------------------------------------------------------------------------------------------------------------
# 4. `dvc exp run -S` in the git repository
# ---------------------------------------------------------------------------------------------------------------------


def _experiments(show: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """The revisions of the experiments `dvc exp show --json` lists under the baseline commit."""
    base = next(e for e in show if e["rev"] == baseline)
    return [rev for exp in base.get("experiments") or [] for rev in exp["revs"]]


def _metrics(entry: dict[str, Any]) -> dict[str, Any]:
    return entry["data"]["metrics"]


def test_exp_run_sets_a_param_and_reruns_only_ppo_and_downstream(experiment, seed, project):
    out = experiment["out"]
    after_ppo = downstream(project, "ppo")
    assert RAN.findall(out) == [s for s in stages(project) if s in after_ppo], out[-3000:]
    assert SKIPPED.findall(out) == [s for s in stages(project) if s not in after_ppo]
    assert re.search(r"^Ran experiment\(s\): \S+", out, re.M), out[-2000:]

    exps = _experiments(experiment["show"], experiment["baseline"])
    assert len(exps) == 1, exps
    exp = exps[0]
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["ppo"]["kl_coef"] == 0.2 and params["ppo"]["seed"] == seed["old"] + 1  # -S on top of the baseline

    metrics = _metrics(exp)
    errors = {p: m["error"] for p, m in metrics.items() if "error" in m}
    assert errors == {}, errors  # every stage's metrics readable from the experiment's commit
    assert metrics["artifacts/ppo/metrics.json"]["data"]["final"]["objective/kl_coef"] == 0.2  # PPO used the value
    assert metrics["artifacts/ppo/metrics.json"]["data"]["outcome"] == "completed"
    assert metrics["artifacts/evaluate/metrics.json"]["data"]["win_rate_vs_sft"] is not None

    base = next(e for e in experiment["show"] if e["rev"] == experiment["baseline"])
    base_metrics = _metrics(base)
    assert "error" not in base_metrics["artifacts/ppo/metrics.json"]
    assert base_metrics["artifacts/ppo/metrics.json"]["data"]["final"]["objective/kl_coef"] != 0.2
    for name in UPSTREAM:  # the experiment reused the upstream stages: same metrics, same dvc.lock entries
        path = f"artifacts/{name}/metrics.json"
        assert metrics[path] == base_metrics[path]
        assert experiment["lock_after"][name] == experiment["lock_before"][name]
    assert experiment["lock_after"]["ppo"]["params"]["params.yaml"]["ppo"]["kl_coef"] == 0.2


# ---------------------------------------------------------------------------------------------------------------------
# 5. Metrics and plots
# ---------------------------------------------------------------------------------------------------------------------


def test_metrics_show_lists_every_stage(fresh, project):
    shown: dict[str, Any] = {}
    for rev in fresh["metrics"].values():  # one entry: the workspace
        assert "error" not in rev, rev
        shown.update(rev["data"])
    for name, stage in spec(project)["stages"].items():
        files = paths(stage.get("metrics"))
        assert files, f"{name} has no metrics"
        for f in files:
            assert f in shown and "error" not in shown[f], (f, shown.get(f))
            assert _scalars(shown[f]["data"]) == _scalars(fresh["metric_files"][f])  # what the stage wrote
    assert shown["artifacts/reward_gate/metrics.json"]["data"]["passed"] is True
    assert shown["artifacts/ppo/metrics.json"]["data"]["steps_done"] == OVERRIDES["ppo"]["num_steps"]


def test_metrics_and_params_diff_against_head(seed):
    assert "failed to load" not in seed["metrics_diff_stderr"], seed["metrics_diff_stderr"]
    diff = seed["metrics_diff"]
    assert seed["params_diff"] == {"params.yaml": {"ppo.seed": {"old": seed["old"], "new": seed["old"] + 1, "diff": 1}}}
    assert not {f"artifacts/{name}/metrics.json" for name in UPSTREAM} & set(diff)  # upstream metrics unchanged
    ppo = diff["artifacts/ppo/metrics.json"]
    # both sides read: HEAD's metrics come from the DVC cache (artifacts/ is not in git)
    numeric = {k: v for k, v in ppo.items() if isinstance(v["old"], int | float) and isinstance(v["new"], int | float)}
    assert numeric, ppo
    assert all(v["old"] is not None for v in diff["artifacts/evaluate/metrics.json"].values())


def test_plots_show_renders_every_top_level_plot_with_the_data(fresh, project):
    rendered = fresh["plots"]
    assert not rendered.get("errors"), rendered.get("errors")
    definitions = spec(project)["plots"]
    titles = {next(iter(d)) for d in definitions}
    assert {
        "PPO KL to the reference (nats per response)",
        "PPO reward",
        "RM calibration (held-out accuracy by reward gap)",
    } <= titles
    assert set(rendered["data"]) == titles  # only the configured plots, no unconfigured default plot of a data file
    for definition in definitions:
        ((title, conf),) = definition.items()
        assert title in rendered["data"], title
        (plot,) = rendered["data"][title]
        assert plot["type"] == "vega" and plot["revisions"] == ["workspace"]
        values = plot["content"]["data"]["values"]
        for file, ys in conf["y"].items():
            ys = [ys] if isinstance(ys, str) else ys
            source = fresh["plot_files"][file]  # what the stages wrote
            assert source, f"{file} is empty"
            for y in ys:
                expected = sorted((float(r[conf["x"]]), float(r[y])) for r in source)
                # with several y fields DVC tags each row with the field it plots
                got = sorted((float(v[conf["x"]]), float(v[y])) for v in values if v.get("field", y) == y)
                assert got == expected, (title, y)

    assert len(fresh["plot_files"]["artifacts/ppo/kl.csv"]) == OVERRIDES["ppo"]["num_steps"]  # a row per PPO step

    out, plots_dir = fresh["plots_html"]
    html = plots_dir / "index.html"
    assert html.exists(), out
    text = html.read_text()
    assert all(title in text for title in titles)

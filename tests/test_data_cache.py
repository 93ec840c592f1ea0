"""The generated default data lands in the DVC cache, matching data.dvc, so `dvc push` sends it and a teammate's
`dvc pull` finds it (issue: a second clone's `dvc pull` failed on data/, which had never been cached)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from flows.orchestrate import ensure_data
from tests.helpers import BIN, ROOT, run


def clone_like(dest: Path) -> Path:
    """What a fresh clone has: data.dvc, params.yaml, .dvc/config, no data/ and an empty cache."""
    dest.mkdir()
    for name in ("data.dvc", "params.yaml", ".dvcignore", "dvc.yaml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    run(["git", "init", "-q"], dest)
    return dest


def cached(project: Path) -> bool:
    md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    return (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists()


def data_status(project: Path) -> str:
    return run([sys.executable, "-m", "dvc", "status", "data.dvc"], project).stdout


def test_make_data_puts_data_in_the_cache_matching_data_dvc(tmp_path):
    project = clone_like(tmp_path / "p")
    assert not cached(project)
    run([str(BIN / "rlhf"), "make-data"], project)
    assert (project / "data.dvc").read_text() == (ROOT / "data.dvc").read_text()  # the same version
    assert cached(project)
    assert "up to date" in data_status(project)


def test_a_run_that_generates_data_caches_it_too(tmp_path):
    project = clone_like(tmp_path / "p")
    said: list[str] = []
    assert ensure_data(project, said.append)
    assert cached(project) and "up to date" in data_status(project)
    assert not ensure_data(project, said.append) and len(said) == 1  # present and cached: nothing to do


def test_data_from_a_changed_task_is_committed_as_a_new_version(tmp_path):
    project = clone_like(tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["task"]["seed"] = params["task"]["seed"] + 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    said: list[str] = []
    ensure_data(project, said.append)
    assert (project / "data.dvc").read_text() != (ROOT / "data.dvc").read_text()
    assert cached(project) and "up to date" in data_status(project)
    assert any("committed as a new version" in s for s in said)

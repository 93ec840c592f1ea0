"""The documentation: README.md stays short and its links resolve, the site builds with `mkdocs build --strict` with no
network, and every generated number agrees with its results file (docs/fill_numbers.py --check), which fails naming
the page when one of them changes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ROOT / "docs" / "fill_numbers.py"
MKDOCS = Path(sys.executable).parent / "mkdocs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
# Any HTTP(S) request during the build goes to a closed port and fails: the build must need none.
OFFLINE = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def numbers(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(NUMBERS), "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The pages and the results files in a fresh folder, to change one of them."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("screenshots", "__pycache__"))
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns(".venv*", "*_runs"))
    return tmp_path


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/ (at most 200)"


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md"])
def test_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    targets = [t for t in LINK.findall(path.read_text()) if not re.match(r"^([a-z]+:|#)", t)]
    assert targets, f"{page} links to nothing"
    missing = [t for t in targets if not (path.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page} links to files that do not exist: {missing}"


def test_every_results_file_is_listed_once_in_the_benchmarks_readme() -> None:
    listed = (ROOT / "benchmarks/README.md").read_text()
    files = sorted(p.name for p in (ROOT / "benchmarks").glob("*.json"))
    assert files, "no results files found"
    missing = [f for f in files if f"`{f}`" not in listed]
    assert not missing, f"benchmarks/README.md (the one list of results files) does not list {missing}"


def test_site_builds_strict_and_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"} | OFFLINE | {"NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    proc = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    home = (site / "index.html").read_text()
    assert "fonts.googleapis.com" not in home and "fonts.gstatic.com" not in home
    assert (site / "screenshots" / "mlflow-runs.png").exists()
    assert not list(site.rglob("*.py")), "docs/fill_numbers.py is a tool, not a page of the site"


def test_numbers_agree_with_their_results_files() -> None:
    proc = numbers("--check")
    assert proc.returncode == 0, f"run `python docs/fill_numbers.py`:\n{proc.stderr}"


def test_a_number_changed_on_a_page_fails_naming_the_page(copy: Path) -> None:
    page = copy / "docs" / "results.md"
    text = page.read_text()
    marker = "<!--n:default_task_results/make_run_s@mmss-->"
    assert marker in text
    page.write_text(re.sub(re.escape(marker) + r"[^<]*", marker + "6 min 59 s", text, count=1))
    proc = numbers("--check", root=copy)
    assert proc.returncode == 1
    assert "docs/results.md:" in proc.stderr and "default_task_results/make_run_s" in proc.stderr
    assert "'6 min 59 s'" in proc.stderr and "'7 min 41 s'" in proc.stderr
    assert numbers(root=copy).returncode == 0  # rewriting the pages puts the file's number back
    assert numbers("--check", root=copy).returncode == 0
    assert page.read_text() == text


def test_a_results_file_changed_fails_naming_each_page_and_key(copy: Path) -> None:
    results = copy / "benchmarks" / "make_run_results.json"
    recorded = json.loads(results.read_text())
    recorded["evaluate"]["win_rate_vs_sft"] = 0.512
    results.write_text(json.dumps(recorded))
    proc = numbers("--check", root=copy)
    assert proc.returncode == 1
    assert "README.md:" in proc.stderr and "make_run_results/evaluate/win_rate_vs_sft" in proc.stderr
    assert "docs/results.md:" in proc.stderr and "numbers:make-run-results" in proc.stderr  # the table, too


def test_a_table_changed_by_hand_fails(copy: Path) -> None:
    page = copy / "docs" / "ppo.md"
    page.write_text(page.read_text().replace("| 0.492 +- 0.007 |", "| 0.592 +- 0.007 |", 1))
    proc = numbers("--check", root=copy)
    assert proc.returncode == 1 and "docs/ppo.md:" in proc.stderr and "numbers:alignment-table" in proc.stderr


def test_a_broken_or_unknown_reference_fails(copy: Path) -> None:
    page = copy / "docs" / "tests.md"
    page.write_text(
        page.read_text()
        + "\nA <!--n:default_task_results/no_such_key-->1<!--/n--> and a <!--n:stack_results/cpu-->Intel\n"
        + "Xeon<!--/n--> split across lines.\n"
    )
    proc = numbers(root=copy)  # even when rewriting: nothing to write it from
    assert proc.returncode == 1
    assert "docs/tests.md:" in proc.stderr and "has no key 'no_such_key'" in proc.stderr
    assert "without its other half" in proc.stderr

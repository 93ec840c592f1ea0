"""Browser fixtures for the UI tests (tests/test_ui.py, tests/test_label_round.py): Debian's Chromium, installed by
the project's own script when missing, driven headless by playwright.

Screenshots go to RLHF_SCREENSHOTS (a folder; default: a tmp folder); the docs' come from
`RLHF_SCREENSHOTS=docs/screenshots pytest tests/test_ui.py tests/test_label_round.py`."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Debian's chromium in a container: no sandbox (root), no GPU, nothing that phones home (shared/ENVIRONMENT.md)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # a loaded 2-core machine renders slowly


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        if os.geteuid() != 0:
            pytest.skip("needs Debian's chromium (run as root to have it installed)")
        subprocess.run([str(ROOT / "docker/debian-packages.sh"), "chromium"], check=True, timeout=1200)
    # playwright's own browser download is impossible here: it drives the system's chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("RLHF_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder

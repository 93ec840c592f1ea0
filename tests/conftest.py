"""Shared test set-up: no telemetry, no network, the project root as working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.lib.environment import quiet

pytest_plugins = ["tests.stack_fixtures"]  # the session's stack for tests/test_stack.py and tests/test_ui.py

ROOT = Path(__file__).resolve().parents[1]

quiet()
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture
def root() -> Path:
    return ROOT

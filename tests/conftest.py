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


@pytest.fixture(autouse=True)
def fresh_mlflow_experiment():
    """A test that ran a stage in process leaves MLflow's active experiment behind (a module global and the
    MLFLOW_EXPERIMENT_ID variable, both set by mlflow.set_experiment); the next test's store does not have that id."""
    yield
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)

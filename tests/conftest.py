"""Shared test set-up: no telemetry, no network, the project root as working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stages.lib.environment import quiet

pytest_plugins = [
    "tests.stack_fixtures",
    "tests.browser_fixtures",
]  # the session's stack for tests/test_stack.py and tests/test_ui.py

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


_MLFLOW_ENV = {
    key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
}


@pytest.fixture(autouse=True, scope="module")
def fresh_mlflow_uris():
    """A module that called mlflow.set_tracking_uri (even to put back the URI it found) leaves it pinned in a module
    global and in MLFLOW_TRACKING_URI, which then beat a later module's environment: both are put back after each
    module (its own module-scoped fixtures rely on them until then)."""
    yield
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    tracking._tracking_uri = None
    registry._registry_uri = None
    _put_back(*_MLFLOW_ENV)


@pytest.fixture(autouse=True)
def fresh_mlflow_experiment():
    """A test that ran a stage in process leaves MLflow's active experiment behind (a module global and the
    MLFLOW_EXPERIMENT_ID variable, both set by mlflow.set_experiment); the next test's store does not have that id."""
    yield
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    _put_back("MLFLOW_EXPERIMENT_ID")


def _put_back(*keys: str) -> None:
    """These MLflow variables as they were when the session started."""
    for key in keys:
        if _MLFLOW_ENV[key] is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = _MLFLOW_ENV[key]

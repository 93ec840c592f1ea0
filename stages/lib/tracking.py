"""Experiment tracking behind one small interface: a stage records its params, metrics, tags and artifacts through a
`Tracker`, so its `run()` can be given a stand-in (`NullTracker`) in tests and on non-main processes.

`MlflowTracker` is the real one (default store `sqlite:///mlflow.db`), opened by `mlflow_run`. When the orchestrator
passes a parent run id (`RLHF_PARENT_RUN_ID`), each stage's run is nested under it, so one pipeline run is one parent
with a child per stage. Two stages also use MLflow beyond tracking: promotion works the Model Registry, and evaluation
loads a registered model by URI (`rlhf eval --model-uri`).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from stages.lib.environment import quiet

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rlhf"


class Tracker(Protocol):
    """What a stage may record."""

    run_id: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """A `Tracker` that records nothing: for tests, for the non-main processes of a multi-process run, and for
    code that runs outside a tracked stage."""

    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class MlflowTracker:
    """A `Tracker` writing to the active MLflow run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = {k: (str(v)[:6000]) for k, v in _flatten(params).items()}
        mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def redact_uri(uri: str) -> str:
    """`uri` as it may be printed or logged: a password in `user:password@host` shown as ***."""
    return re.sub(r"(?<=://)([^/:@]*):[^@/]*@", r"\1:***@", uri)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def mlflow_run(stage: str, tags: dict[str, str] | None = None) -> Iterator[MlflowTracker]:
    """Open this stage's MLflow run (nested under RLHF_PARENT_RUN_ID when set); it ends FAILED on an exception."""
    import mlflow

    quiet()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    parent = os.environ.get("RLHF_PARENT_RUN_ID") or None
    # host and pid: a run left RUNNING by a killed process is found and ended by the next pipeline (flows/lifecycle.py)
    where = {"rlhf.host": socket.gethostname(), "rlhf.pid": str(os.getpid())}
    if image := os.environ.get("RLHF_IMAGE"):  # set by the docker runner (flows/runners.py)
        where["rlhf.image"] = image
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None,
                          tags={"rlhf.stage": stage, **where, **(tags or {})}) as run:  # fmt: skip
        yield MlflowTracker(run.info.run_id)


def trainer_callback(tracker: Tracker, prefix: str = ""):
    """A transformers `TrainerCallback` that forwards the Trainer's logs (loss, lr, eval metrics) to `tracker`."""
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs:
                tracker.log_metrics({f"{prefix}{k}": v for k, v in logs.items()}, step=state.global_step)

    return _Forward()

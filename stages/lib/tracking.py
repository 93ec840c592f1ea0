"""Experiment tracking behind one small interface: a stage records its params, metrics, tags and artifacts through a
`Tracker`, so its `run()` can be given a stand-in (`NullTracker`) in tests and on non-main processes.

`MlflowTracker` is the real one (default store `sqlite:///mlflow.db`), opened by `mlflow_run`. When the orchestrator
passes a parent run id (`RLHF_PARENT_RUN_ID`), each stage's run is nested under it, so one pipeline run is one parent
with a child per stage. Two stages also use MLflow beyond tracking: promotion works the Model Registry, and evaluation
loads a registered model by URI (`rlhf eval --model-uri`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from stages.lib.environment import quiet

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "rlhf"
# MLflow 3's UI opens an experiment without this tag on its GenAI traces overview ("Traces 0"), as if nothing had been
# logged. The value is the UI's ExperimentKind for classic training ("Machine learning"); its "..._inferred" values and
# "no_inferred_type" are the UI's own guesses, which we overwrite, while a kind someone chose is left alone.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


class Tracker(Protocol):
    """What a stage may record."""

    run_id: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...


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

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        pass


class MlflowTracker:
    """A `Tracker` writing to the active MLflow run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params(flat_params(params))

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

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table (a JSON artifact the UI shows as a table and can compare across runs)."""
        import mlflow

        if rows:
            mlflow.log_table({key: [row.get(key) for row in rows] for key in rows[0]}, artifact_file=artifact_file)


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    """Nested params as MLflow params: dotted keys (`ppo.kl_coef`), values as strings within MLflow's 6000 chars.
    The stages' runs and the pipeline's parent run log them alike, so their columns line up in the UI."""
    return {k: str(v)[:6000] for k, v in _flatten(params).items()}


def ensure_experiment(name: str, artifact_root: str | None = None, client: Any = None) -> str:
    """The id of experiment `name`, created if missing, with the kind that makes MLflow's UI open it on its runs."""
    import mlflow

    client = client or mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_root, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except mlflow.exceptions.MlflowException:  # created meanwhile by another stage or pipeline
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    kind = found.tags.get(EXPERIMENT_KIND_TAG, "")
    if kind != TRAINING_KIND and (not kind or kind.endswith("_inferred") or kind == "no_inferred_type"):
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return found.experiment_id


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
    mlflow.set_experiment(experiment_id=ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)))
    parent = os.environ.get("RLHF_PARENT_RUN_ID") or None
    where = {"rlhf.host": socket.gethostname()}
    if image := os.environ.get("RLHF_IMAGE"):  # set by the docker runner (flows/containers.py)
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

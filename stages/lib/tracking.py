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
from typing import Any, Protocol, runtime_checkable

from stages.lib.environment import quiet
from stages.lib.outcome import Unavailable

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the working directory's own store
DEFAULT_EXPERIMENT = "rlhf"
# MLflow 3's UI opens an experiment without this tag on its GenAI traces overview ("Traces 0"), as if nothing had been
# logged. The value is the UI's ExperimentKind for classic training ("Machine learning"); its "..._inferred" values and
# "no_inferred_type" are the UI's own guesses, which we overwrite, while a kind someone chose is left alone.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def tracking_uri() -> str:
    """Where runs are tracked: MLFLOW_TRACKING_URI, else the working directory's sqlite:///mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


@runtime_checkable
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
    """Open this stage's MLflow run (nested under RLHF_PARENT_RUN_ID when set); it ends FAILED on an exception.

    A tracking server that goes away is waited for: MLflow retries every call with exponential backoff (about 4 min
    by default; MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR set it). If it is still away,
    the stage stops as Unavailable (exit 69) with one line, and a rerun records it afresh."""
    import mlflow

    quiet()
    mlflow.set_tracking_uri(uri := tracking_uri())
    parent = os.environ.get("RLHF_PARENT_RUN_ID") or None
    # host and pid: a run left RUNNING by a killed process is found and ended by the next pipeline (flows/lifecycle.py)
    where = {"rlhf.host": socket.gethostname(), "rlhf.pid": str(os.getpid())}
    if image := os.environ.get("RLHF_IMAGE"):  # set by the docker runner (flows/runners.py)
        where["rlhf.image"] = image
    try:
        mlflow.set_experiment(
            experiment_id=ensure_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
        )
        dvc_stage = os.environ.get("DVC_STAGE", "")
        round_ = dvc_stage if dvc_stage.startswith(f"{stage}_r") else None  # a later round's stage: ppo_r2, ...
        with mlflow.start_run(
            run_name=round_ or stage,
            parent_run_id=parent,
            nested=parent is not None,
            tags={
                "rlhf.stage": stage,
                **({"rlhf.round": round_.rsplit("_r", 1)[1]} if round_ else {}),
                **where,
                **(tags or {}),
            },
        ) as run:
            yield MlflowTracker(run.info.run_id)
    except Exception as e:
        if not server_unreachable(e):
            raise
        raise Unavailable(
            f"the MLflow tracking server {uri} did not answer ({_cause(e)}), even after MLflow's "
            f"retries: {stage}'s results are not all recorded there; run it again when the server is "
            "back"
        ) from e


def _cause(error: BaseException) -> str:
    """A few words for why a request failed (MLflow's own message repeats the URL and urllib3's retry state)."""
    text = str(error)
    for needle, said in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("RemoteDisconnected", "connection dropped"),
        ("Connection aborted", "connection dropped"),
        ("Connection reset", "connection reset"),
    ):
        if needle in text:
            return said
    return text.splitlines()[0][:160] if text else type(error).__name__


def server_unreachable(error: BaseException) -> bool:
    """`error` says the tracking server (or the database behind it) did not answer after MLflow's own retries, rather
    than that a request was wrong: a refused or dropped connection, a timeout, or a 5xx answer."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(error, requests.exceptions.HTTPError):  # artifact uploads and downloads
        return error.response is not None and error.response.status_code >= 500
    if isinstance(error, RestException):  # the server answered with an error of its own (its database is away)
        return error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
    if isinstance(error, MlflowException):  # raised by MLflow's REST client when its retries ran out
        message = str(error.message)
        return message.startswith("API request to") and (
            "failed with exception" in message
            or "failed with timeout" in message
            or "failed with error code 5" in message
        )
    return False


def trainer_callback(tracker: Tracker, prefix: str = ""):
    """A transformers `TrainerCallback` that forwards the Trainer's logs (loss, lr, eval metrics) to `tracker`."""
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs:
                tracker.log_metrics({f"{prefix}{k}": v for k, v in logs.items()}, step=state.global_step)

    return _Forward()

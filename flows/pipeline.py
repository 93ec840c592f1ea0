"""The pipeline as a Prefect flow: the one orchestration loop (flows/orchestrate.py) with each dvc.yaml stage as a task,
plus what DVC lacks: one parent MLflow run per pipeline run (each stage's run nests under it through
`RLHF_PARENT_RUN_ID`; stages/lib/tracking.py), a Failed flow whose name and message are the stopping stage's outcome,
and Prefect artifacts (validation summary, reward gate, PPO KL curve, evaluation report).

    rlhf run --prefect              # this flow, in-process (a temporary Prefect server when PREFECT_API_URL is unset)
    rlhf serve --cron "0 3 * * *"   # this flow as the deployment rlhf-pipeline/rlhf-nightly
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled, Failed, State
from pydantic import Field

from flows import labelling
from flows.lifecycle import project_lock
from flows.orchestrate import data_hash, plan, prepare, run_pipeline, stage_env, tracking_uri_for, up_to_date
from flows.runners import DEFAULT_IMAGE, Runner, StageResult
from stages.lib.label_studio import ACCEPT_ENV
from stages.lib.outcome import Busy, ExitCode, Outcome, StageStop
from stages.lib.params import load_params
from stages.lib.tracking import (
    DEFAULT_EXPERIMENT,
    ensure_experiment,
    flat_params,
    redact_uri,
    server_unreachable,
)

FLOW_NAME = "rlhf-pipeline"
PARENT_STAGE_TAG = "pipeline"  # the parent run's `rlhf.stage`: one pipeline run, one child run per stage
MAX_ARTIFACT_CHARS = 20_000
# The name of the Failed state a stage task (and the flow) ends in, by exit code: the UI says what stopped it.
STATE_NAMES = {
    ExitCode.GATE: "Gate",
    ExitCode.BAD_INPUT: "BadInput",
    ExitCode.NONFINITE: "NonFinite",
    ExitCode.BUSY: "DvcBusy",
    ExitCode.USAGE: "Usage",
    ExitCode.UNAVAILABLE: "Unavailable",
}
AWAITING_LABELS = "AwaitingLabels"  # the state of a run whose comparisons stage waits for people's labels
ROUND_TIMEOUT = 14 * 24 * 3600  # seconds a suspended labelling round may wait for its answer before the run fails


class RoundAnswer(RunInput):
    """What a person answers when resuming a flow run suspended on a labelling round (the Prefect UI's form)."""

    accept: int = Field(0, ge=0)  # close the round once this many comparisons are answered (0: comparisons.wanted)
    stop: bool = False  # end this run here; the labels stay in Label Studio and a later run continues the round


def state_name(code: int) -> str:
    return STATE_NAMES.get(code, "StageCrashed")  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------------------


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def open_parent_run(
    tracking_uri: str, experiment: str, artifact_root: str | None, tags: dict[str, str], params: dict[str, str]
) -> str:
    """Open the pipeline's parent MLflow run (each stage's run nests under it), named so a person can tell it from
    the others, with the whole of params.yaml as its params; returns its run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    # A sqlite store puts a new experiment's artifacts under ./mlruns of the *current* directory: pin the project's.
    experiment_id = ensure_experiment(experiment, artifact_root, client)
    end_stale_runs(client, experiment_id, flow_run_over)
    previous = client.search_runs(
        [experiment_id],
        f"tags.`rlhf.stage` = '{PARENT_STAGE_TAG}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    name = run_name(tags, params, previous[0].data if previous else None)
    run_id = client.create_run(
        experiment_id, tags={**tags, "rlhf.changed": name.rsplit(" · ", 2)[0]}, run_name=name
    ).info.run_id
    try:
        items = [mlflow.entities.Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i : i + 100])
    except Exception:
        client.set_terminated(run_id, "FAILED")  # not a half-made parent left RUNNING
        raise
    return run_id


def _retry_only_when_busy(_task: Any, _task_run: TaskRun, state: State) -> bool:
    """Retry a stage only when another DVC process held the lock (nothing ran); never a gate or a crash."""
    return state.name == STATE_NAMES[ExitCode.BUSY]


@task(
    retries=3,
    retry_delay_seconds=15,
    retry_condition_fn=_retry_only_when_busy,
    cache_policy=NO_CACHE,
    task_run_name="{stage}",
)
def run_stage(
    stage: str, project_dir: str, parent_run_id: str, tracking_uri: str, runner: Runner
) -> StageResult | State:
    """One dvc.yaml stage, `dvc repro --single-item` where `runner` says: DVC skips it when nothing it depends on
    changed. A stage that stops ends the task Failed, named by its outcome, its StageResult as the state's data."""
    env = stage_env({"RLHF_PARENT_RUN_ID": parent_run_id, "MLFLOW_TRACKING_URI": tracking_uri})
    result = runner.reproduce(Path(project_dir), stage, env, get_run_logger().info)
    if not result.stopped:
        return result
    return Failed(
        name=state_name(ExitCode.BUSY if result.status == "busy" else result.code), message=result.message, data=result
    )


def task_execute(project: Path, parent_run_id: str, tracking_uri: str, runner: Runner) -> Callable[[str], StageResult]:
    """`execute` for the shared loop: each stage as the `run_stage` task, its result read back from the task's state."""

    def execute(stage: str) -> StageResult:
        state = run_stage(stage, str(project), parent_run_id, tracking_uri, runner, return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, StageResult):
            return result
        # the task itself crashed (not the stage): say so in the stage's terms
        return StageResult(stage, "failed", ExitCode.CRASH, f"the task failed: {state.message or result}")

    return execute


# ---------------------------------------------------------------------------------------------------------------------
# Lineage: git, data and DVC hashes on the parent run
# ---------------------------------------------------------------------------------------------------------------------


def git_commit(project: Path) -> str | None:
    """HEAD of the project's git repository, with `-dirty` when tracked files changed; None without commits."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, timeout=30)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def stage_hash(project: Path, stage: str) -> str | None:
    """An md5 of the stage's dvc.lock entry (command, dependencies, params and outputs with their hashes)."""
    try:
        entry = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]
    except (OSError, KeyError, TypeError):
        return None
    return hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def pipeline_params(project: Path) -> dict[str, str]:
    """The parent run's params: the whole of params.yaml flattened (`ppo.kl_coef`, the same keys the stages log), the
    git commit and the data hash, so the runs table compares pipelines column by column."""
    path = project / "params.yaml"  # a dvc.yaml pipeline may have none
    params = flat_params((yaml.safe_load(path.read_text()) or {}) if path.exists() else {})
    return params | {"git_commit": git_commit(project) or "-", "data_md5": data_hash(project) or "-"}


def changed_params(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """`key old->new` for each param that differs from the previous pipeline run's (git_commit aside: the name
    carries it)."""
    keys = [k for k in now if k != "git_commit" and before.get(k) != now[k]]
    keys += [k for k in before if k not in now and k != "git_commit"]
    return [
        f"{k} {before.get(k, '-')}->{now.get(k, '-')}" if k != "data_md5" else f"data {now.get(k, '-')[:8]}"
        for k in keys
    ]


def run_name(tags: dict[str, str], params: dict[str, str], previous: Any = None, now: float | None = None) -> str:
    """A parent run's name a person can tell apart in the runs table (whose column shows a name's start): what changed
    since the previous pipeline run, which commit, when; e.g. `ppo.kl_coef 0.2->0.1 · 256f025 · 2026-12-02 08:10`."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(now))
    commit = tags.get("rlhf.git_commit", "no-git")
    commit = commit[:7] + ("+" if commit.endswith("-dirty") else "")  # +: uncommitted changes
    if previous is None or not previous.params:  # no earlier pipeline run (or one from before params were logged)
        what = "first run"
    else:
        changes = changed_params(previous.params, params)
        what = ", ".join(changes[:2]) + (f" +{len(changes) - 2} more" if len(changes) > 2 else "") or "same params"
        if not changes and previous.params.get("git_commit") not in (None, params.get("git_commit")):
            what = "code changed"
    return f"{what[:150]} · {commit} · {when}"


def lineage_tags(project: Path, stages: list[str]) -> dict[str, str]:
    """What the parent run was made from: the git commit, the raw data's hash, the planned stages."""
    tags = {"rlhf.stage": PARENT_STAGE_TAG, "rlhf.stages": ",".join(stages)}
    if commit := git_commit(project):
        tags |= {"rlhf.git_commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")}
    if md5 := data_hash(project):
        tags["rlhf.data_md5"] = md5
    return tags


def _tag_parent(tracking_uri: str, run_id: str, tags: dict[str, str], status: str | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value[:5000])
    if status:
        client.set_terminated(run_id, status)


# The numbers that compare pipelines, copied from each stage's metrics.json onto the parent run (the runs table shows
# them beside params.yaml's columns): {stage: {path in metrics.json: metric name}}; TRL's names where TRL has one.
HEADLINE: dict[str, dict[str, str]] = {
    "sft": {"perplexity": "sft/perplexity", "eval_loss": "sft/eval_loss"},
    "reward": {"accuracy": "reward/accuracy", "rank_agreement_gold": "reward/rank_agreement_gold"},
    "ppo": {
        "final.objective/kl": "objective/kl",
        "final.objective/scores": "objective/scores",
        "final.objective/rlhf_reward": "objective/rlhf_reward",
        "steps_done": "ppo/steps_done",
        "kept_step": "ppo/kept_step",
    },
    "evaluate": {
        "win_rate_vs_sft": "win_rate_vs_sft",
        "rm_win_rate_vs_sft": "rm_win_rate_vs_sft",
        "ppo/judge": "ppo/judge",
        "sft/judge": "sft/judge",
        "ppo/kl_k1_seq": "ppo/kl_k1_seq",
        "alignment_tax": "alignment_tax",
    },
    "promote": {
        "version": "promote/version",
        "promoted": "promote/promoted",
        "win_rate_vs_champion": "promote/win_rate_vs_champion",
    },
}


def headline_metrics(project: Path, stage: str) -> dict[str, float]:
    """The stage's headline numbers (HEADLINE) from its metrics.json, as the parent run's metrics."""
    found = _read_json(project / "artifacts" / stage / "metrics.json") or {}
    out = {}
    for path, name in HEADLINE.get(stage, {}).items():
        value: Any = found
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


def flow_run_state(flow_run_id: str) -> State | None:
    """The flow run's state as this Prefect server knows it; None when it does not know the run (another server's,
    e.g. a temporary one), the id is not a flow run's, or the server cannot be asked."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 (not found, not a flow run id, or the server is away)
        return None


def flow_run_over(flow_run_id: str) -> bool:
    """This Prefect server knows the flow run and says it is over. A flow run it does not know or cannot be asked
    about counts as running: its MLflow runs are left alone."""
    state = flow_run_state(flow_run_id)
    return state is not None and state.is_final()


def end_stale_runs(client: Any, experiment_id: str, over: Callable[[str], bool]) -> list[str]:
    """End FAILED the pipeline runs left RUNNING by a flow that is over (its process was killed, or MLflow was away
    when it ended) and their stage runs, so the runs table says no pipeline runs when none does; returns their ids."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    parents = {r.info.run_id: r for r in running if r.data.tags.get("rlhf.stage") == PARENT_STAGE_TAG}
    stale = {i for i, r in parents.items() if over(r.data.tags.get("prefect.flow_run_id", ""))}
    for run in running:
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id and parent_id not in parents and client.get_run(parent_id).info.status != "RUNNING":
            stale.add(run.info.run_id)  # a stage run whose pipeline already ended
        elif parent_id in stale:
            stale.add(run.info.run_id)
    for run_id in stale:
        client.set_tag(run_id, "rlhf.ended_by", "a later pipeline run: this run's flow was over")
        client.set_terminated(run_id, "FAILED")
    return sorted(stale)


def _end_stale(project: Path) -> list[str]:
    """end_stale_runs in the project's experiment, for a run that opens no parent run of its own (nothing new)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri_for(project))
    found = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    return end_stale_runs(client, found.experiment_id, flow_run_over) if found else []


def _end_orphans(tracking_uri: str, parent_run_id: str) -> list[str]:
    """End FAILED any stage run still RUNNING under the parent: its stage was killed, or the tracking server was
    away when it ended. The flow runs its stages one after another, so none is still working."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    parent = client.get_run(parent_run_id)
    orphans = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    )
    for run in orphans:
        client.set_tag(run.info.run_id, "rlhf.ended_by", "the pipeline flow: the stage left its run RUNNING")
        client.set_terminated(run.info.run_id, "FAILED")
    return [r.info.run_id for r in orphans]


def _quietly(what: str, record: Callable[..., Any], *args: Any) -> Any:
    """Bookkeeping on the parent run that must not end the flow when the tracking server is away (the stages' own
    runs say what they did): a warning in the flow's log instead."""
    try:
        return record(*args)
    except Exception as e:
        if not server_unreachable(e):
            raise
        get_run_logger().warning("MLflow did not answer: %s not recorded (%s)", what, str(e).splitlines()[0][:300])
        return None


def _log_stage_numbers(tracking_uri: str, run_id: str, project: Path, result: StageResult) -> None:
    """On the parent run: the stage's wall time in the flow (`dvc repro --single-item`, start-up included) as
    `seconds.<stage>`, and its headline metrics (also when DVC skipped it: they describe this pipeline's outputs)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    metrics = [mlflow.entities.Metric(f"seconds.{result.stage}", result.seconds, int(time.time() * 1000), 0)]
    metrics += [
        mlflow.entities.Metric(k, v, int(time.time() * 1000), 0)
        for k, v in headline_metrics(project, result.stage).items()
    ]
    client.log_batch(run_id, metrics=metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Prefect artifacts: what a reader of the flow run wants to see without opening files
# ---------------------------------------------------------------------------------------------------------------------


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ARTIFACT_CHARS else text[:MAX_ARTIFACT_CHARS] + "\n\n... (truncated)"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def publish_validation(project: Path) -> str | None:
    path = project / "reports/validate/report.md"
    if not path.exists():
        return None
    text = _truncate(path.read_text(encoding="utf-8", errors="replace"))
    if not re.search(r"^(#|\|)", text, re.M):  # the report is plain text: keep its layout
        text = f"```text\n{text}\n```"
    create_markdown_artifact(
        f"# Data validation\n\n{text}", key="validation-summary", description=str(path.relative_to(project))
    )
    return "validation-summary"


def publish_reward_gate(project: Path) -> str | None:
    verdict = _read_json(project / "artifacts/reward_gate/metrics.json")
    if not verdict:
        return None
    rows = [{"metric": "gate", "value": verdict.get("reason", "")}]
    rows += [
        {"metric": k, "value": round(v, 4) if isinstance(v, float) else v}
        for k, v in verdict.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    create_table_artifact(rows, key="reward-gate", description=verdict.get("reason", "reward-model gate"))
    return "reward-gate"


def publish_ppo(project: Path, max_rows: int = 20) -> str | None:
    import csv

    path = project / "artifacts/ppo/kl.csv"
    if not path.exists():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = [
        c
        for c in (
            "step",
            "objective/kl",
            "objective/kl_k3",
            "objective/scores",
            "objective/rlhf_reward",
            "policy/approxkl_avg",
        )
        if rows and c in rows[0]
    ]
    every = max(1, math.ceil(len(rows) / max_rows))
    shown = rows[::every] + ([rows[-1]] if rows and (len(rows) - 1) % every else [])
    metrics = _read_json(project / "artifacts/ppo/metrics.json") or {}
    lines = [
        f"**outcome**: {metrics.get('outcome', '?')}: {metrics.get('reason', '')}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in shown]
    create_markdown_artifact(
        "# PPO: KL to the reference and scores\n\n" + "\n".join(lines),
        key="ppo-kl",
        description=f"artifacts/ppo/kl.csv, every {every} step(s)",
    )
    return "ppo-kl"


def publish_evaluation(project: Path) -> str | None:
    path = project / "artifacts/evaluate/report.md"
    if not path.exists():
        return None
    create_markdown_artifact(
        _truncate(path.read_text(encoding="utf-8", errors="replace")),
        key="evaluation-report",
        description="artifacts/evaluate/report.md",
    )
    return "evaluation-report"


# Optional per-stage reports; a stage without one runs all the same (the plan comes from dvc.yaml alone).
PUBLISHERS: dict[str, Callable[[Path], str | None]] = {
    "validate": publish_validation,
    "reward_gate": publish_reward_gate,
    "ppo": publish_ppo,
    "evaluate": publish_evaluation,
}


def promotion(project: Path) -> dict[str, Any] | None:
    """The promote stage's verdict (artifacts/promote/metrics.json), if that stage has run."""
    return _read_json(project / "artifacts/promote/metrics.json")


# ---------------------------------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------------------------------


@flow(name=FLOW_NAME)
def rlhf_pipeline(
    project_dir: str = ".",
    stages: list[str] | None = None,
    runner: str = "local",
    image: str = DEFAULT_IMAGE,
    gpus: str | None = None,
) -> dict[str, Any] | State:
    """Run dvc.yaml's stages in order, each as a task; stop with a Failed state named by the stopping stage's outcome.

    `runner="docker"` runs each stage in its own container of `image` (`make images`), with `gpus` passed to
    `docker run --gpus` (e.g. "all" for the CUDA image); the default runs them in this process."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    names = plan(project, stages)
    where = Runner(runner, image, gpus)
    where.check()
    try:
        with project_lock(project):  # a scheduled run that arrives while a person's run (or the last one) still goes
            if (other := _round_open_elsewhere(project)) is not None:
                return other
            if (answer := _answered_round(project)) is not None and answer.stop:
                labelling.clear_marker(project)
                return Cancelled(message="stopped at the labelling round by a person; its labels stay in Label "
                                 "Studio and the next run continues the round")  # fmt: skip
            if answer is not None and answer.accept > 0:
                os.environ[ACCEPT_ENV] = str(answer.accept)
            try:
                if (pulled := labelling.refresh(project)) is not None:
                    logger.info("pulled %d annotations of the open labelling round", pulled)
            except StageStop as e:  # Label Studio away: the stage says what it has, the round stays open
                logger.warning("the open labelling round's labels were not pulled: %s", e)
            result = _pipeline(project, names, where, runner, image)
            if not (isinstance(result, State) and result.name == AWAITING_LABELS):
                labelling.clear_marker(project)
                return result
            if (ended := _open_round(project, result)) is not None:  # under the lock: one run owns the round
                return ended
        # a deployment's run suspends (its process ends; resumed, the flow starts over from the top)
        suspend_flow_run(wait_for_input=RoundAnswer, timeout=ROUND_TIMEOUT, key=_round_key(project))
        return result  # not reached
    except Busy as e:  # the run lock, or DVC's lock while the data is committed: nothing ran, no MLflow run opened
        logger.warning("busy: %s", e)
        return Failed(
            name=state_name(ExitCode.BUSY),
            message=str(e),
            data=_nothing_ran(project, names, ExitCode.BUSY, skipped=[]),
        )
    except StageStop as e:  # Label Studio away while a round is opened
        return Failed(name=state_name(e.code), message=str(e), data=_nothing_ran(project, names, e.code, skipped=[]))
    finally:
        os.environ.pop(ACCEPT_ENV, None)


def _round_key(project: Path) -> str:
    """The suspend key of this flow run's latest suspension on the round (one per suspension)."""
    return f"labels-{labelling.read_marker(project)['suspensions'] - 1}"


def _round_open_elsewhere(project: Path) -> State | None:
    """A run that arrives while another flow run is suspended on this project's labelling round ends at once: one
    round is answered by one run (the suspended one continues when resumed). A marker whose run is not suspended
    (cancelled, over, unknown to this server, or a run that could not suspend) is taken over."""
    from prefect.runtime import flow_run

    marker = labelling.read_marker(project)
    if not marker.get("suspended") or marker.get("flow_run_id") == str(flow_run.id):
        return None
    state = flow_run_state(marker["flow_run_id"])
    if state is None or not state.is_paused():  # not suspended, or unknown here: nobody holds the round
        return None
    return Failed(
        name=AWAITING_LABELS,
        message=f"a labelling round is open: flow run {marker.get('flow_run_name')} ({marker['flow_run_id']}) is "
        f"suspended on it ({marker.get('link')}); resume or cancel that run. Nothing ran.",
        data=_nothing_ran(project, [], ExitCode.BUSY, skipped=[]),
    )


def _answered_round(project: Path) -> RoundAnswer | None:
    """In a flow run that was suspended on a round and resumed: the person's answer (Prefect hands it back to the
    same suspend call, by its key, without suspending again)."""
    from prefect.runtime import flow_run

    marker = labelling.read_marker(project)
    if marker.get("flow_run_id") != str(flow_run.id) or not marker.get("suspensions"):
        return None
    return suspend_flow_run(wait_for_input=RoundAnswer, timeout=ROUND_TIMEOUT, key=_round_key(project))


def _open_round(project: Path, waiting: State) -> State | None:
    """The comparisons stage waits for people: open the round in Label Studio (its project, the tasks imported
    once), say where and how many (a Prefect artifact), and record the round in the marker. None: a deployment's run,
    to be suspended by the caller. A run outside a deployment cannot be suspended: its state, saying what to do (with
    no Label Studio configured, the stage's own words: export by hand)."""
    from prefect.runtime import deployment, flow_run

    suspendable = deployment.id is not None
    reports = labelling.stage_reports(project, (waiting.data or {}).get("stopped_at", "comparisons"))
    try:
        round_ = labelling.current_round(project, load_params(project / "params.yaml"), reports)
    except StageStop as e:
        if suspendable:
            raise
        get_run_logger().info("no Label Studio to open the round in (%s): the export is yours to bring", e)
        return waiting
    status = round_.status()
    create_markdown_artifact(
        key="labelling-round",
        markdown=f"# Labelling round\n\n{status}\n\nLabel in Label Studio: {round_.link}\n\nResume this flow run "
        "(Prefect UI: Resume) when enough are labelled, or earlier with `accept` set to how many to take; `stop` "
        "ends the run and keeps the round open.\n",
        description="the comparisons stage waits for people's labels",
    )
    get_run_logger().info("labelling round open: %s", status)
    marker = labelling.read_marker(project)
    count = marker.get("suspensions", 0) if marker.get("flow_run_id") == str(flow_run.id) else 0
    labelling.write_marker(
        project,
        {"flow_run_id": str(flow_run.id), "flow_run_name": str(flow_run.name), "link": round_.link,
         "reports": reports, "suspended": suspendable, "suspensions": count + suspendable},
    )  # fmt: skip
    if suspendable:
        return None
    message = f"{waiting.message}; {status}; label there, then `rlhf label pull` and run again"
    return Failed(name=AWAITING_LABELS, message=message, data=waiting.data)


def _nothing_ran(project: Path, names: list[str], exit_code: ExitCode, **extra: Any) -> dict[str, Any]:
    """The flow's summary when no stage ran: busy, or nothing new since the last run."""
    return {"project_dir": str(project), "plan": names, "ran": [], "restored": [], "artifacts": [],
            "exit_code": exit_code, "parent_run_id": None, **extra}  # fmt: skip


def _pipeline(project: Path, names: list[str], where: Runner, runner: str, image: str) -> dict[str, Any] | State:
    """The flow's body, under the project's run lock."""
    logger = get_run_logger()
    prepare(project, logger.info)
    if nothing := up_to_date(project, names):  # a scheduled run with nothing new: one line, no empty MLflow run
        logger.info(nothing)
        _quietly("ending runs left RUNNING by flows that are over", _end_stale, project)  # as a working run would
        return _nothing_ran(project, names, ExitCode.OK, skipped=names, nothing_new=nothing)
    tracking_uri, parent_run_id = _open_parent(project, names, runner, image)
    artifacts: list[str] = []
    status = "FAILED"
    try:
        execute = task_execute(project, parent_run_id, tracking_uri, where)
        pipeline = run_pipeline(project, names, execute, _after_stage(project, tracking_uri, parent_run_id, artifacts))
        summary = {
            "project_dir": str(project),
            "parent_run_id": parent_run_id,
            "tracking_uri": tracking_uri,
            "plan": names,
            "ran": pipeline.names("ran"),
            "skipped": pipeline.names("skipped"),
            "restored": pipeline.names("restored"),
            "artifacts": artifacts,
            "exit_code": pipeline.exit_code,
            "stages": {r.stage: {"status": r.status, "seconds": r.seconds} for r in pipeline.results},
        }
        if (stop := pipeline.stopped) is not None:
            waiting = labelling.awaiting(stop.stage, stop.code, stop.reason)  # people's labels: not a failure
            outcome = "busy" if stop.status == "busy" else Outcome(stop.stage, stop.code).kind
            outcome = "awaiting labels" if waiting else outcome
            said = {"rlhf.outcome": outcome, "rlhf.stopped_at": stop.stage, "rlhf.reason": stop.reason}
            _quietly("the outcome", _tag_parent, tracking_uri, parent_run_id, said)
            status = "FINISHED" if waiting else status
            summary["stopped_at"] = stop.stage
            name = AWAITING_LABELS if waiting else state_name(pipeline.exit_code)
            return Failed(name=name, message=stop.message, data=summary)
        summary["promotion"] = promotion(project) if "promote" in names else None
        said = {"rlhf.outcome": "completed", "rlhf.ran": ",".join(summary["ran"]) or "-"}
        _quietly("the outcome", _tag_parent, tracking_uri, parent_run_id, said)
        status = "FINISHED"
        logger.info(pipeline.summary())
        return summary
    finally:  # a parent left RUNNING here (MLflow away) is ended by the next pipeline run (end_stale_runs)
        _quietly("ending stage runs left RUNNING", _end_orphans, tracking_uri, parent_run_id)
        _quietly("the parent run's status", _tag_parent, tracking_uri, parent_run_id, {}, status)


def _open_parent(project: Path, names: list[str], runner: str, image: str) -> tuple[str, str]:
    """The flow's parent MLflow run, tagged with its lineage and this flow run: (tracking URI, parent run id)."""
    from prefect.runtime import flow_run

    tracking_uri = tracking_uri_for(project)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    artifact_root = str(project / "mlruns" / experiment) if tracking_uri.startswith("sqlite:") else None
    tags = lineage_tags(project, names) | {
        "prefect.flow_run_id": str(flow_run.id),
        "rlhf.pid": str(os.getpid()),
        "rlhf.host": socket.gethostname(),
        "prefect.flow_run_name": str(flow_run.name),
        "rlhf.runner": runner,
    }
    if runner == "docker":
        tags["rlhf.image"] = image
    parent_run_id = open_parent_run(tracking_uri, experiment, artifact_root, tags, pipeline_params(project))
    get_run_logger().info(
        "MLflow parent run %s (%s, experiment %r)", parent_run_id, redact_uri(tracking_uri), experiment
    )
    return tracking_uri, parent_run_id


def _answered(project: Path, result: StageResult) -> bool:
    """`result` is the comparisons stage of the round a person answered (the marker's), past it now."""
    if ACCEPT_ENV not in os.environ or result.status not in ("ran", "restored"):
        return False
    comparisons = result.stage.startswith("comparisons")
    return comparisons and labelling.stage_reports(project, result.stage) == labelling.waiting_reports(project)


def _after_stage(
    project: Path, tracking_uri: str, parent_run_id: str, artifacts: list[str]
) -> Callable[[StageResult], None]:
    """The flow's hook after each stage: its Prefect artifact (a gate's report says why it stopped: published then
    too; its key appended to `artifacts`), its dvc.lock hash, wall time and headline metrics on the parent run."""

    def after(result: StageResult) -> None:
        publish = PUBLISHERS.get(result.stage)  # round 1's stages (their files are where these read)
        if publish and (not result.stopped or result.code == ExitCode.GATE) and (key := publish(project)):
            artifacts.append(key)
        if _answered(project, result):  # a person's `accept` answers their round, not a later round in this run
            os.environ.pop(ACCEPT_ENV, None)
        if not result.stopped:
            if digest := stage_hash(project, result.stage):
                tag = {f"dvc.stage.{result.stage}": digest}
                _quietly("the stage's dvc.lock hash", _tag_parent, tracking_uri, parent_run_id, tag)
            _quietly("the stage's numbers", _log_stage_numbers, tracking_uri, parent_run_id, project, result)

    return after

"""Both UIs in a real browser (headless Debian Chromium driven by playwright) against the session's stack: what a
person sees after the pipeline ran twice (tests/stack_fixtures.py, tests/test_stack.py's `by_worker`).

Screenshots go to RLHF_SCREENSHOTS (a folder; default: the test's tmp folder); README's come from
`RLHF_SCREENSHOTS=docs/screenshots pytest tests/test_ui.py` (the labelling round's: tests/test_label_round.py)."""

from __future__ import annotations

import json
import re

import pytest

from tests.stack_fixtures import SECOND_KL_COEF, Stack, flow_run_of, name_of

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" panel beside every page: close it (it takes a third of the screen)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_mlflow_opens_rlhf_on_its_runs_with_nested_stage_runs(page, stack: Stack, first, by_worker, shots):
    experiment = stack.experiment_id()
    new = next(p for p in stack.parents() if flow_run_of(p) == by_worker["flow_run_id"])
    # the link `rlhf run --stack` prints: the "Model training" view (3.17's default is the GenAI overview)
    page.goto(f"{stack.config.mlflow_url}/#/experiments/{experiment}?workflowType=machine_learning")
    page.get_by_text(name_of(new)).first.wait_for()
    _close_assistant(page)
    assert page.get_by_text(name_of(first.parent)).count() >= 1
    assert page.get_by_text("Traces 0").count() == 0  # not the GenAI overview

    row = page.locator(".ag-row", has_text=name_of(first.parent))
    row.first.locator("button").first.click()  # expand: the stage runs nest under the pipeline run
    for stage in ("validate", "sft", "reward", "judge", "reward_gate", "ppo", "evaluate", "promote"):
        page.get_by_text(stage, exact=True).first.wait_for()
    page.screenshot(path=str(shots / "mlflow-runs.png"))


def test_mlflow_compare_view_puts_params_beside_metrics(page, stack: Stack, first, by_worker, shots):
    new = next(p for p in stack.parents() if flow_run_of(p) == by_worker["flow_run_id"])
    runs = json.dumps([new.info.run_id, first.parent.info.run_id])
    page.goto(f"{stack.config.mlflow_url}/#/compare-runs?runs={runs}&experiments={json.dumps([stack.experiment_id()])}")
    page.get_by_text("ppo.kl_coef").first.wait_for()
    _close_assistant(page)

    def row(name: str):  # a param's or metric's row: its name in the row header, one cell per run
        return page.locator("tr").filter(has=page.locator("th", has_text=re.compile(f"^{re.escape(name)}$")))

    # metrics sit in a virtualised list of "Plot chart" links (only rows in view are rendered): the first few
    for metric in ("alignment_tax", "objective/kl", "ppo/kl_k1_seq"):
        page.get_by_role("link", name=metric, exact=True).first.wait_for()
    for toggle in page.get_by_text("Show diff only").all():  # params and metrics: only what differs
        toggle.click()
    kl_coef = row("ppo.kl_coef")
    for value in (first.parent.data.params["ppo.kl_coef"], str(SECOND_KL_COEF)):
        kl_coef.get_by_text(value, exact=True).wait_for()
    assert row("ppo.num_steps").count() == 0 and row("sft.epochs").count() == 0  # equal params are hidden
    page.get_by_text("Parameters", exact=True).first.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "mlflow-compare.png"))


def test_mlflow_registry_shows_the_champion(page, stack: Stack, by_worker, shots):
    champion = stack.mlflow.get_model_version_by_alias("rlhf-policy", "champion")
    previous = stack.mlflow.get_model_version_by_alias("rlhf-policy", "previous-champion")
    page.goto(f"{stack.config.mlflow_url}/#/models/rlhf-policy")
    page.get_by_text(re.compile(r"^@\schampion$")).first.wait_for()
    _close_assistant(page)

    def same_row(alias: str, version: str) -> bool:  # the versions table is made of divs: compare heights on screen
        a = page.get_by_text(re.compile(rf"^@\s{alias}$")).first.bounding_box()  # the alias chip "@ champion"
        v = page.get_by_role("link", name=f"Version {version}", exact=True).first.bounding_box()
        return abs((a["y"] + a["height"] / 2) - (v["y"] + v["height"] / 2)) < 0.6 * v["height"] + 12

    assert same_row("champion", champion.version) and same_row("previous-champion", previous.version)
    page.screenshot(path=str(shots / "mlflow-registry.png"))


def test_prefect_shows_the_flow_run_with_task_states_and_artifacts(page, stack: Stack, first, shots):
    run = stack.flow_run(first.flow_run_id)
    page.goto(f"{stack.config.prefect_url}/runs/flow-run/{first.flow_run_id}")
    page.get_by_text(run["name"]).first.wait_for()
    page.get_by_text("Completed").first.wait_for()  # the flow run's state badge (the timeline itself is a canvas)
    assert "Can't connect to Server API" not in page.content()

    page.get_by_text("Task Runs", exact=True).first.click()
    for stage in ("validate", "sft", "reward", "judge", "reward_gate", "ppo", "evaluate", "promote"):
        page.get_by_text(stage, exact=True).first.wait_for()
    page.get_by_text(f"({len(stack.task_runs(first.flow_run_id))} Completed)").wait_for()
    page.screenshot(path=str(shots / "prefect-flow-run.png"))

    page.get_by_text("Artifacts", exact=True).first.click()
    for key in ("validation-summary", "reward-gate", "ppo-kl", "evaluation-report"):
        page.get_by_text(key, exact=True).first.wait_for()
    page.screenshot(path=str(shots / "prefect-artifacts.png"))

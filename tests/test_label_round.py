"""The human labelling round end to end, for real: the stack with Label Studio (`rlhf stack up --label-studio-port`,
tests/stack_fixtures.py), prefect.yaml's deployment run by the stack's worker until the comparisons stage waits for
people and the flow run suspends; two accounts label in Label Studio's web UI from headless Chromium (the admin, and
an annotator who signs up through the invite link) and through Label Studio's own SDK (label-studio-sdk, run by the
Python of Label Studio's venv: it pins what the project's environment cannot hold), one round is cancelled half-way and
continued by a new run, a run that arrives while the round is open ends at once, the flow run is resumed through
Prefect's API with a typed input, and the reward model trains on exactly the majority of what was given."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import labelling
from flows import stack as stack_mod
from stages.lib.io import read_jsonl
from tests.helpers import BIN, ROOT, clear_schedules, deep_merge, make_project
from tests.stack_fixtures import PASSING, Stack, sh, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]

PAIRS = {"train_pairs": 8, "test_pairs": 4}  # 12 comparisons, each labelled by both accounts
ROUND = {"labeler": "human", "labels": "labels/round-1.json", "overlap": 2, **PAIRS}
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module")
def project(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project whose comparisons are labelled by people, prefect.yaml's deployment registered from it."""
    root = make_project(tmp_path_factory.mktemp("label-round") / "p", deep_merge(PASSING, {"comparisons": ROUND}))
    shutil.copy(ROOT / "prefect.yaml", root)
    shutil.copytree(ROOT / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    assert stack_mod.register_deployment(stack.config, root, print)
    clear_schedules("rlhf-pipeline/rlhf-process", root, _client(stack))
    return root


def _client(stack: Stack) -> dict[str, str]:
    return {**stack.client_env, "PREFECT_API_URL": stack.config.prefect_api_url}


def _trigger(stack: Stack, project: Path) -> str:
    """A run of the deployment, logging to an experiment of its own: the session's stack is shared with test_stack,
    whose team expects the first pipeline run in experiment "rlhf" to be theirs (named "first run")."""
    env = '--job-variable=env={"MLFLOW_EXPERIMENT_NAME": "rlhf-label-round"}'
    cmd = [str(BIN / "prefect"), "deployment", "run", "rlhf-pipeline/rlhf-process", env]
    done = sh(cmd, project, _client(stack))
    return done.stdout.split("UUID:")[1].split()[0]


def _state(stack: Stack, flow_run_id: str, types: tuple[str, ...], timeout: float = 900) -> dict[str, Any]:
    return wait_for(
        f"flow run {flow_run_id} in {types}",
        lambda: (r := stack.flow_run(flow_run_id))["state_type"] in types and r,
        timeout,
        2,
    )


def _ls(stack: Stack) -> labelling.LabelStudio:
    return labelling.LabelStudio(stack.config.label_studio_url, stack_mod.label_studio_token(stack.config))


def _login(page, stack: Stack, email: str, password: str) -> None:  # noqa: ANN001
    page.goto(f"{stack.config.label_studio_url}/user/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/" not in url)  # logged in: Label Studio's home


def _sign_up(page, invite: str, email: str, password: str) -> None:  # noqa: ANN001
    page.goto(invite)
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/user/" not in url)  # logged in: Label Studio's home


SDK_LABEL = """
import json, os, sys
from label_studio_sdk import LabelStudio

ls = LabelStudio(base_url=os.environ["LS_URL"], api_key=os.environ["LS_TOKEN"])
choices = json.load(sys.stdin)
for task, choice in choices.items():
    result = {"from_name": "choice", "to_name": "prompt", "type": "choices", "value": {"choices": [choice]}}
    ls.annotations.create(id=int(task), result=[result])
print(json.dumps(sum(len(ls.annotations.list(id=int(task))) for task in choices)))
"""


def _label_with_sdk(stack: Stack, choices: dict[int, str]) -> int:
    """Label `choices` ({task id: A or B}) as the admin through label-studio-sdk in Label Studio's venv (the URL and
    token in the environment, never on a command line); returns how many annotations those tasks then have."""
    token = stack_mod.label_studio_token(stack.config)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # the venv's own Python
    done = subprocess.run(
        [str(stack_mod.label_studio_venv() / "bin" / "python"), "-c", SDK_LABEL],
        input=json.dumps({str(t): c for t, c in choices.items()}),
        env={**env, "LS_URL": stack.config.label_studio_url, "LS_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prefect_page(page, stack: Stack, flow_run_id: str, state: str, shot: Path) -> None:  # noqa: ANN001
    """The flow run's page in the Prefect UI shows `state` and the round's `labelling-round` artifact."""
    page.goto(f"{stack.config.prefect_url}/runs/flow-run/{flow_run_id}")
    page.get_by_text(stack.flow_run(flow_run_id)["name"]).first.wait_for()
    page.get_by_text(state, exact=True).first.wait_for()
    assert "Can't connect to Server API" not in page.content()
    page.get_by_text("submitted to infrastructure").first.wait_for()  # the logs are in
    page.wait_for_timeout(2000)  # the timeline is a canvas: no element to wait for (only the screenshot needs it)
    page.screenshot(path=str(shot))
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("labelling-round", exact=True).first.wait_for()


def _pump(page, what: str, check, timeout_ms: int = 120_000) -> None:  # noqa: ANN001
    """Wait until `check()`, letting playwright deliver its events meanwhile (time.sleep would not)."""
    for _ in range(timeout_ms // 200):
        if check():
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"timed out waiting for {what}")


def _label_in_ui(page, stack: Stack, project_id: int, choose, n: int, shots: Path | None = None) -> dict[int, str]:  # noqa: ANN001
    """Label `n` tasks of the project's label stream by clicking `choose(task_id)` (A or B) and Submit; returns what
    was clicked per task (the stream's next task is the one Label Studio's data manager hands out)."""
    shown: list[int | None] = []  # each next task handed out (None: none left for this account)

    def seen(response) -> None:  # noqa: ANN001
        if "/api/dm/actions?id=next_task" in response.url:
            shown.append(int(response.json()["id"]) if response.status == 200 else None)

    page.on("response", seen)
    page.goto(f"{stack.config.label_studio_url}/projects/{project_id}/data?labeling=1")
    clicked: dict[int, str] = {}
    for i in range(n):
        page.locator('label:has(input[name="Both bad"])').wait_for()
        _pump(page, "the task's id", lambda: len(shown) > len(clicked) and shown[-1] is not None)
        task = int(shown[-1])
        clicked[task] = choose(task)
        page.locator(f'label:has(input[name="{clicked[task]}"])').click()
        if shots is not None and i == 0:
            page.screenshot(path=str(shots / "label-studio-comparison.png"))
        page.get_by_role("button", name="Submit").first.click()
        _pump(page, "the next task after the submitted annotation", lambda: len(shown) > len(clicked))
    page.remove_listener("response", seen)
    return clicked


def test_a_labelling_round_in_label_studio_suspends_the_flow_and_trains_on_what_people_clicked(
    stack: Stack,
    project: Path,
    page,
    shots: Path,  # noqa: ANN001
):
    ls = _ls(stack)
    # 1. the worker's run reaches the comparisons stage and suspends on the round
    first = _trigger(stack, project)
    paused = _state(stack, first, ("PAUSED", *FINAL))
    assert paused["state_type"] == "PAUSED" and paused["state"]["name"] == "Suspended", paused["state"]["message"]
    marker = json.loads((project / labelling.MARKER).read_text())
    assert marker["flow_run_id"] == first and marker["suspensions"] == 1
    project_id = int(marker["link"].rstrip("/").split("/")[-2])
    assert ls.progress(project_id)["task_number"] == 12
    tasks = {t["id"]: t["data"] for t in ls.export(project_id)}
    # 2. a run that arrives while the round is open ends at once, running nothing
    second = _trigger(stack, project)
    ended = _state(stack, second, FINAL)
    assert ended["state"]["name"] == "AwaitingLabels" and "a labelling round is open" in ended["state"]["message"]
    # 3. the admin labels half in the web UI, then the suspended run is cancelled
    admin_password = (stack.config.home / "secrets/label_studio_password").read_text().strip()
    _login(page, stack, stack_mod.LABEL_STUDIO_ADMIN, admin_password)
    prefers_first = lambda task: "A" if task % 2 else "B"  # noqa: E731
    clicked_admin = _label_in_ui(page, stack, project_id, prefers_first, 6, shots)
    stack.prefect(f"/flow_runs/{first}/set_state", {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True})
    _state(stack, first, ("CANCELLED",))
    # 4. a new run continues the same round: the labels given are still there, and it suspends again
    third = _trigger(stack, project)
    assert _state(stack, third, ("PAUSED", *FINAL))["state_type"] == "PAUSED"
    assert json.loads((project / labelling.MARKER).read_text())["link"] == marker["link"]  # the same project
    round_report = json.loads((project / "reports/comparisons/round.json").read_text())
    assert round_report["annotations"] == 6  # pulled before the stage ran: nothing labelled was lost
    rest = {task: prefers_first(task) for task in tasks if task not in clicked_admin}  # the admin's other half: the SDK
    assert len(rest) == 6 and _label_with_sdk(stack, rest) == 6
    clicked_admin |= rest
    _prefect_page(page, stack, third, "Suspended", shots / "prefect-suspended.png")  # the UI shows it waiting
    # 5. a second account signs up through the invite link and labels every pair, disagreeing on every third task
    page.context.clear_cookies()
    _sign_up(page, ls.invite_link(), "annotator-two@localhost", "a-long-password-2")
    second_view = lambda task: prefers_first(task) if task % 3 else {"A": "B", "B": "A"}[prefers_first(task)]  # noqa: E731
    clicked_two = _label_in_ui(page, stack, project_id, second_view, 12)
    assert sorted(clicked_admin) == sorted(clicked_two) == sorted(tasks)
    # 6. resumed with a typed input, the run pulls the labels and goes on to the reward model and beyond
    stack.prefect(f"/flow_runs/{third}/resume", {"run_input": {"accept": 0, "stop": False}})
    done = _state(stack, third, FINAL, 1200)
    assert done["state_type"] == "COMPLETED", done["state"]
    _prefect_page(page, stack, third, "Completed", shots / "prefect-resumed.png")
    metrics = json.loads((project / "artifacts/comparisons/metrics.json").read_text())
    agree = [task for task in tasks if clicked_admin[task] == clicked_two[task]]
    assert metrics["annotators"] == 2 and metrics["annotations"] == 24
    assert metrics["annotator_agreement"] == pytest.approx(len(agree) / len(tasks))
    assert metrics["split_votes"] == len(tasks) - len(agree)  # one against one: left out
    pairs = {p["id"]: p for p in read_jsonl(project / "reports/comparisons/pairs.jsonl")}

    def chosen(task: int) -> tuple[str, str, str]:  # what the admin's click means, by the pair's id and shown order
        d = tasks[task]
        pair = pairs[d["pair"]]
        first_side = d["order"][0] if clicked_admin[task] == "A" else d["order"][1]
        return (pair["prompt"], pair[first_side], pair["b" if first_side == "a" else "a"])

    expected = sorted(chosen(t) for t, d in tasks.items() if t in agree and d["split"] == "train")
    trained = [json.loads(x) for x in (project / "artifacts/comparisons/preferences.jsonl").read_text().splitlines()]
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in trained) == expected
    params = yaml.safe_load((project / "params.yaml").read_text())
    offline = read_jsonl(project / "artifacts/validate/data/preferences.jsonl")[: params["reward"]["offline_pairs"]]
    reward = json.loads((project / "artifacts/reward/metrics.json").read_text())
    assert reward["n_train"] == len(offline) + len(trained)  # the offline pairs and exactly those labels
    assert not (project / labelling.MARKER).exists()
    # tracked in the round's own experiment (the job variable reached the flow run), none in the team's "rlhf"
    human = "params.`comparisons.labeler` = 'human'"
    assert stack.runs(human, experiment="rlhf-label-round")
    assert stack.mlflow.get_experiment_by_name("rlhf") is None or not stack.runs(human)
    # pseudonymous: no account's e-mail address in any file the pipeline wrote (the export is scrubbed when pulled)
    for folder in ("labels", "reports", "artifacts"):
        for f in (project / folder).rglob("*"):
            if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".xml", ".csv", ".txt"):
                assert "@localhost" not in f.read_text(errors="replace"), f

"""A human labelling round on a Label Studio server: the comparisons stage's tasks pushed into a project, progress,
and the annotations pulled back as the JSON export the stage reads (`comparisons.labels`). Used by `rlhf label` and
by the Prefect flow, which suspends while a round is open (flows/pipeline.py).

The server and its token: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a team's own Label Studio), else the project's
stack (`rlhf stack up --label-studio`: the URL in its state, the admin's token in <dir>/secrets/label_studio_token).
Label Studio's REST API (1.23) with the standard library: its SDK (label-studio-sdk 2.1) needs numpy < 2.3 through
opencv-python-headless, which the project's environment cannot take, so the SDK stays in Label Studio's own venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.sync import base_name, options, round_file, round_of, rounds_of
from stages.lib.io import read_jsonl, write_json
from stages.lib.label_studio import AWAITING
from stages.lib.outcome import BadInput, Unavailable
from stages.lib.params import load_params

PRIVATE = ("created_username", "email", "first_name", "last_name", "username", "avatar", "initials", "phone")


@dataclass(frozen=True)
class LabelStudio:
    url: str  # what the pipeline calls
    token: str
    timeout: float = 120.0
    public: str = ""  # what people open, where it differs (compose: the published port): LABEL_STUDIO_PUBLIC_URL

    @property
    def site(self) -> str:
        """The base of the links people are given (the round's project, the invite)."""
        return (self.public or self.url).rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; Unavailable naming the server and the answer (never the token) when it fails."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Token {self.token}", "Content-Type": "application/json"}
        request = urllib.request.Request(f"{self.url.rstrip('/')}{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:  # noqa: S310 (the configured server)
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            said = e.read()[:300].decode(errors="replace")
            raise Unavailable(f"Label Studio at {self.url} answered {method} {path} with {e.code}: {said}") from None
        except (OSError, ValueError) as e:
            raise Unavailable(f"Label Studio at {self.url} did not answer {method} {path}: {e}") from None

    def find_project(self, title: str) -> dict[str, Any] | None:
        found = self.call("GET", "/api/projects?page_size=1000&" + urllib.parse.urlencode({"title": title}))
        projects = found.get("results", []) if isinstance(found, dict) else found
        return next((p for p in projects if p.get("title") == title), None)

    def export(self, project: int) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (Label Studio's JSON export, unlabelled tasks included)."""
        return self.call("GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=true")

    def progress(self, project: int) -> dict[str, int]:
        p = self.call("GET", f"/api/projects/{project}")
        keys = ("task_number", "num_tasks_with_annotations", "total_annotations_number", "skipped_annotations_number")
        return {k: int(p.get(k) or 0) for k in keys}

    def invite_link(self) -> str:
        """A sign-up link for a new annotator of the organisation."""
        return self.site + self.call("GET", "/api/invite")["invite_url"]


def connect(project: Path) -> LabelStudio:
    """The Label Studio this project labels in (see the module docstring)."""
    url, token = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if not (url and token):
        from flows.stack import config_from, label_studio_token

        config = config_from(project)
        if not config.label_studio_port:
            raise Unavailable(
                "no Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a team's own), or start the "
                "project's stack with it (`rlhf stack up --label-studio`)"
            )
        secret = config.home / "secrets" / "label_studio_token"
        if not token and not secret.exists():
            raise Unavailable(
                f"the stack in {config.home} has no Label Studio token yet: `rlhf stack up --label-studio`"
            )
        url, token = url or config.label_studio_url, token or label_studio_token(config)
    return LabelStudio(url, token, public=os.environ.get("LABEL_STUDIO_PUBLIC_URL", ""))


@dataclass(frozen=True)
class RoundFiles:
    """What the comparisons stage wrote for a human round (its --reports folder)."""

    reports: Path

    @property
    def pairs(self) -> list[dict[str, Any]]:
        path = self.reports / "pairs.jsonl"
        if not (self.reports / "tasks.json").exists() or not path.exists():
            raise BadInput(
                f"no labelling round in {self.reports}: run the comparisons stage with comparisons.labeler: human "
                "first (`rlhf run`)"
            )
        return read_jsonl(path)

    @property
    def title(self) -> str:
        """The project's title: the round and a digest of its pairs (a new sample of replies is a new project)."""
        pairs = self.pairs
        digest = hashlib.sha1("".join(sorted(p["id"] for p in pairs)).encode()).hexdigest()[:8]
        return f"rlhf comparisons round {pairs[0]['round'] if pairs else 1} ({digest})"


def open_round(ls: LabelStudio, reports: Path, overlap: int = 1) -> tuple[int, str, bool]:
    """The round's project: reused when it exists (the round continues: nothing re-imported, a deleted task stays
    deleted), else created with the labelling config and the tasks imported. (project id, link, created)."""
    files = RoundFiles(reports)
    title = files.title
    project = ls.find_project(title)
    created = project is None
    if project is None:
        config = (reports / "label_config.xml").read_text(encoding="utf-8")
        body = {"title": title, "label_config": config, "maximum_annotations": overlap}  # people per task
        project = ls.call("POST", "/api/projects", body)
    if created or not ls.progress(int(project["id"]))["task_number"]:  # new, or an import that failed half-way
        tasks = json.loads((reports / "tasks.json").read_text(encoding="utf-8"))
        ls.call("POST", f"/api/projects/{project['id']}/import", tasks)
    return int(project["id"]), f"{ls.site}/projects/{project['id']}/data", created


def scrub(obj: Any) -> Any:
    """The export without names or e-mail addresses (`created_username` is "<e-mail>, <id>"); ids stay."""
    if isinstance(obj, dict):
        return {k: (v.get("id") if k == "completed_by" and isinstance(v, dict) else scrub(v))
                for k, v in obj.items() if k not in PRIVATE}  # fmt: skip
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def pull(ls: LabelStudio, project: int, dest: Path) -> int:
    """The project's export, scrubbed, written to `dest` (the comparisons stage's labels file) only when it changed
    (DVC reruns the stage on a new hash); returns the annotations in it."""
    export = scrub(ls.export(project))
    try:
        same = json.loads(dest.read_text(encoding="utf-8")) == export
    except (OSError, ValueError):  # none yet, or not JSON
        same = False
    if not same:
        write_json(dest, export)
    return sum(len(t.get("annotations") or []) for t in export)


@dataclass(frozen=True)
class Round:
    """The open round of this project: its Label Studio project, where its export goes, and how many labels close it."""

    ls: LabelStudio
    project: int
    link: str
    created: bool
    labels: Path  # comparisons.labels: where the export is written, the stage's --labels
    wanted: int
    pairs: int

    overlap: int = 1

    def status(self) -> str:
        """Progress counted as the stage counts it: pairs answered (not skipped) by `overlap` people each."""
        export = self.ls.export(self.project)
        answers = [sum(not a.get("was_cancelled") for a in t.get("annotations") or []) for t in export]
        skipped = sum(bool(a.get("was_cancelled")) for t in export for a in t.get("annotations") or [])
        done = sum(n >= self.overlap for n in answers)
        return (
            f"round {self.link}: {done} of {len(export)} comparisons answered by {self.overlap} "
            f"{'person' if self.overlap == 1 else 'people'} ({sum(answers)} annotations, {skipped} skipped); "
            f"{self.wanted} close the round"
        )


DEFAULT_REPORTS = "reports/comparisons"  # round 1's comparisons stage's --reports (round r's: reports/comparisons_r<r>)


def current_round(project: Path, params: dict[str, Any], reports: str = DEFAULT_REPORTS) -> Round:
    """Open (or continue) the round the comparisons stage wrote in `reports`, on the project's Label Studio."""
    compare = params.get("comparisons") or {}
    if compare.get("labeler") != "human" or not compare.get("labels"):
        raise BadInput(
            "comparisons.labeler is not human (with comparisons.labels naming the export): no round to label"
        )
    ls = connect(project)
    folder = project / reports
    pairs = len(RoundFiles(folder).pairs)
    overlap = int(compare.get("overlap") or 1)
    pid, link, created = open_round(ls, folder, overlap)
    wanted = min(int(compare.get("wanted") or pairs), pairs)
    return Round(ls, pid, link, created, project / labels_file(compare["labels"], reports), wanted, pairs, overlap)


def _comparisons_options(project: Path) -> dict[str, dict[str, str]]:
    """Each comparisons stage of dvc.yaml (comparisons, comparisons_r2, ...), in file order, with its command's
    options. (Read here, not through flows.orchestrate's dvc_stages: orchestrate imports this module.)"""
    import yaml

    stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages") or {}
    return {
        name: dict(options(str(stage["cmd"])))
        for name, stage in stages.items()
        if base_name(name) == "comparisons" and str(stage.get("cmd", "")).startswith("python -m stages.")
    }


def stage_reports(project: Path, stage: str) -> str:
    """The --reports folder of the comparisons stage `stage` (comparisons, comparisons_r2, ...) in dvc.yaml."""
    return _comparisons_options(project).get(stage, {}).get("--reports", DEFAULT_REPORTS)


def waiting_reports(project: Path) -> str:
    """The reports folder of the round people are labelling: the open round's (the marker), else the first
    comparisons stage in dvc.yaml that wrote its tasks but has no outputs (it stopped for labels: DVC removes a
    stage's outputs before it runs), else round 1's."""
    if reports := read_marker(project).get("reports"):
        return reports
    for given in _comparisons_options(project).values():
        reports, out = given.get("--reports", DEFAULT_REPORTS), given.get("--out", "")
        if (project / reports / "tasks.json").exists() and not (project / out / "metrics.json").exists():
            return reports
    return DEFAULT_REPORTS


def labels_file(labels: str, reports: str) -> str:
    """The export of the round whose comparisons stage writes `reports` (reports/comparisons_r2: round 2's file)."""
    return round_file(labels, round_of(reports))


MARKER = ".rlhf/label-round.json"  # the flow run suspended on the open round, and how often it suspended


def ensure_labels_file(project: Path, params: dict[str, Any], echo: Any = print) -> None:
    """An empty labels file where comparisons.labels names one that does not exist yet (no labels given), so DVC,
    which refuses a missing dependency, runs the stage and the stage says what to do."""
    compare = params.get("comparisons") or {}
    if compare.get("labeler") not in ("file", "human") or not compare.get("labels"):
        return
    for r in range(1, rounds_of(params) + 1):  # every round's file (flows/sync.py round_file)
        path = project / round_file(compare["labels"], r)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("[]\n" if compare["labeler"] == "human" else "", encoding="utf-8")
            echo(f"no labels yet: {path.relative_to(project)} created empty")


def awaiting(stage: str, code: int, reason: str) -> bool:
    """The stage that stopped is a comparisons stage waiting for people's labels (not a real error)."""
    return stage.startswith("comparisons") and code == 65 and AWAITING in reason


def refresh(project: Path) -> int | None:
    """Pull an open round's labels into its labels file before a run, so the stage sees what people have done
    (a run cancelled mid-round loses nothing). Only while a round is open (the marker, which names the round's
    reports folder): a closed round's labels stay as they closed it, whatever is annotated later. None when nothing
    was pulled (nothing is created here)."""
    if not (marker := read_marker(project)):
        return None
    compare = load_params(project / "params.yaml").get("comparisons") or {}
    if compare.get("labeler") != "human":
        return None
    reports = marker.get("reports", DEFAULT_REPORTS)
    ls = connect(project)
    found = ls.find_project(RoundFiles(project / reports).title)
    return None if found is None else pull(ls, int(found["id"]), project / labels_file(compare["labels"], reports))


def read_marker(project: Path) -> dict[str, Any]:
    try:
        return json.loads((project / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(project: Path, marker: dict[str, Any]) -> None:
    write_json(project / MARKER, marker)


def clear_marker(project: Path) -> None:
    (project / MARKER).unlink(missing_ok=True)

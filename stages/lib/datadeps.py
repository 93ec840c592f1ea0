"""The user's data files are the validate stage's DVC dependencies, wherever they live.

`params.yaml: data` may name files outside `data/` (a team's own preference set anywhere on disk). DVC tracks only
what a stage lists in `deps`, so each such file must be passed to the validate stage (`--data PATH` in its command,
hence a dep): then editing it makes `dvc status` name the validate stage, `dvc repro` reruns it and everything
downstream, and dvc.lock records its hash. `rlhf sync` (and `rlhf run`, which syncs first) writes those options
(flows/sync.py); the validate stage refuses a data file its command does not name, so a plain `dvc repro` cannot
silently validate data it does not track.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_DATA = "data"  # always a dependency: the default task's raw data (data.dvc)


def local_paths(data: dict[str, Any], project: Path) -> list[str]:
    """The paths of `params.yaml: data` that are local files or folders (not Hugging Face dataset names), as written."""
    out = []
    for spec in (data or {}).values():
        path = str((spec or {}).get("path", ""))
        if path and ((project / path).exists() or Path(path).is_absolute() or "/" in path or Path(path).suffix):
            out.append(path)
        if drops := str((spec or {}).get("drops") or ""):  # a folder of batches: always local
            out.append(drops)
    return out


def covered(path: str, deps: list[str], project: Path) -> bool:
    """Whether `path` is one of `deps` or inside one of them (a folder dependency covers its files)."""
    target = (project / path).resolve()
    for dep in deps:
        base = (project / dep).resolve()
        if target == base or base in target.parents:
            return True
    return False


def uncovered(data: dict[str, Any], deps: list[str], project: Path) -> list[str]:
    """The local data paths of params.yaml that none of `deps` covers, in params.yaml's order, each once."""
    return list(dict.fromkeys(p for p in local_paths(data, project) if not covered(p, deps, project)))

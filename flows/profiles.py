"""Profiles: a named overlay of params.yaml that holds only what differs from it (`profiles/<name>.yaml`).

`rlhf run --profile real` writes the overlay's values into params.yaml, comments and order kept, and runs the
pipeline. That is what `dvc exp run -S key=value` does to the workspace: params.yaml stays the one file DVC tracks
hyperparameters in, `dvc status` / `dvc params diff` / `dvc exp show` see the profile's values, dvc.lock records
them, and `git diff params.yaml` shows exactly what the profile changed (`git checkout params.yaml` goes back).
Mappings merge key by key, except `data`, which a profile replaces whole (it names its own datasets). A `profile`
section is about the profile itself (how to make its data) and is not written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from stages.lib.params import ParamsError

PROFILES = "profiles"
REPLACED_WHOLE = ("data",)
META = "profile"


def profile_path(project: Path, name: str) -> Path:
    path = project / PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (project / PROFILES).glob("*.yaml"))
        raise ParamsError(f"no profile {name!r} ({path} is missing); profiles here: {', '.join(known) or 'none'}")
    return path


def overlay(project: Path, name: str) -> dict[str, Any]:
    data = yaml.safe_load(profile_path(project, name).read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{profile_path(project, name)} must be a mapping of params.yaml's sections")
    return data


def dialogues(project: Path, name: str) -> tuple[int, str]:
    """(how many dialogues `rlhf make-data --profile NAME` writes, where): the profile's `profile.dialogues` and its
    `data.preferences.path`."""
    over = overlay(project, name)
    try:
        return int(over[META]["dialogues"]), str(over["data"]["preferences"]["path"])
    except (KeyError, TypeError, ValueError):
        raise ParamsError(
            f"profile {name!r} makes no data: it needs `profile.dialogues` and `data.preferences.path`"
        ) from None


def merge(base: Any, over: dict[str, Any], changed: list[str], where: str = "") -> None:
    """Write `over` into `base` (a ruamel mapping, so comments stay), listing each changed key as 'a.b: old -> new'."""
    for key, value in over.items():
        name = f"{where}{key}"
        if where == "" and key not in base:
            raise ParamsError(f"profile key {name!r} is not a section of params.yaml")
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and name not in REPLACED_WHOLE:
            merge(old, value, changed, f"{name}.")
        elif old != value:
            base[key] = value
            changed.append(f"{name}: {_short(old)} -> {_short(value)}")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain_float(representer: Any, value: float) -> Any:
    """A float as YAML 1.1 readers (PyYAML, which loads params.yaml) read one: 0.00005, not 5e-05 (a string to them)."""
    import numpy as np

    text = (
        np.format_float_positional(value, trim="0")
        if np.isfinite(value)
        else {1: ".inf", -1: "-.inf"}.get(int(np.sign(value)), ".nan")
    )
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def apply(project: Path, name: str) -> list[str]:
    """params.yaml with profile `name` written into it; returns what changed (empty: it was already applied)."""
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: comments, order and quoting stay as the user wrote them
    rt.width = 120
    rt.representer.add_representer(float, _plain_float)
    path = project / "params.yaml"
    params = rt.load(path.read_text())
    changed: list[str] = []
    merge(params, {k: v for k, v in overlay(project, name).items() if k != META}, changed)
    if changed:
        with path.open("w") as f:
            rt.dump(params, f)
    return changed

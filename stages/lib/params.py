"""params.yaml is the single home of every hyperparameter; this module turns its sections into typed configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.lib.outcome import BadInput

PARAMS_FILE = Path("params.yaml")
C = TypeVar("C")


class ParamsError(BadInput, ValueError):
    """params.yaml is missing, unreadable, or has a key or value the stage does not know (bad input: exit 65)."""


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params.yaml as a dict."""
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ParamsError(f"no params file {path}") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must be a mapping of sections, not {type(params).__name__}")
    return params


def config_from(cls: type[C], section: dict[str, Any] | None, **overrides: Any) -> C:
    """Build the frozen config dataclass `cls` from a params.yaml section; unknown keys are an error (typos)."""
    values = {**(section or {}), **overrides}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ParamsError(f"{cls.__name__}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # a dataclass's own checks (__post_init__): one line, not a traceback
        raise ParamsError(f"{cls.__name__}: {e}") from None


def load_config(cls: type[C], stage: str, path: str | Path = PARAMS_FILE, **overrides: Any) -> C:
    """The config of one stage, read from its section of params.yaml."""
    return config_from(cls, load_params(path).get(stage), **overrides)


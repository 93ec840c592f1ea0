"""params.yaml is the single home of every hyperparameter; this module turns its sections into typed configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

PARAMS_FILE = Path("params.yaml")
C = TypeVar("C")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params.yaml as a dict."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def config_from(cls: type[C], section: dict[str, Any] | None, **overrides: Any) -> C:
    """Build the frozen config dataclass `cls` from a params.yaml section; unknown keys are an error (typos)."""
    values = {**(section or {}), **overrides}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def load_config(cls: type[C], stage: str, path: str | Path = PARAMS_FILE, **overrides: Any) -> C:
    """The config of one stage, read from its section of params.yaml."""
    return config_from(cls, load_params(path).get(stage), **overrides)

"""params.yaml is the single home of every hyperparameter; this module turns its sections into typed configs.

A config dataclass declares names, types (its annotations) and ranges (`RANGES`), never values: a field has no
default, so a value lives in params.yaml alone (tests/test_params.py enumerates every config class and checks it).
`SECTION` names the params.yaml section a top-level config reads. A field whose type is itself a config dataclass
(ppo.kl_guard, sft.lora, ...) is a nested section, built the same way.

`config_from` checks a section against its dataclass before building it, so a wrong value is one line naming the
key, the value and what is allowed, never a TypeError from deep inside a stage:
    - unknown keys (typos) and missing keys are errors;
    - each value has the type the dataclass declares (typing.get_type_hints): an int is accepted where a float is
      declared, a bool is not a number, a string is not a number, containers are checked element by element;
    - each value is in the range the config declares in its `RANGES` (a ClassVar: field name -> Allowed), e.g.
      learning rates > 0, batch sizes >= 1, fractions in [0, 1], a string among its choices.

Code without a params file of its own (tests, benchmarks) builds a config with `defaults(cls, **overrides)`: the
project's own params.yaml, with overrides merged in.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stages.lib.escaping import printable
from stages.lib.outcome import BadInput

PARAMS_FILE = Path("params.yaml")
PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"  # this checkout's own
C = TypeVar("C")


class ParamsError(BadInput, ValueError):
    """params.yaml is missing, unreadable, or has a key or value the stage does not know (bad input: exit 65)."""


@dataclass(frozen=True)
class Allowed:
    """What a param may be: a number in [low, high] (either end open or absent), or one of `choices`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else "finite"


POSITIVE = Allowed(0, low_open=True)  # learning rates, epochs, temperatures used as divisors
NON_NEGATIVE = Allowed(0)  # coefficients, seeds, counts that may be 0
AT_LEAST_ONE = Allowed(1)  # batch sizes, steps, lengths
FRACTION = Allowed(0, 1)  # [0, 1]
OPEN_FRACTION = Allowed(0, 1, low_open=True, high_open=True)  # (0, 1)
FINITE = Allowed()  # any finite number


def one_of(*choices: Any) -> Allowed:
    return Allowed(choices=choices)


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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint: Any) -> str:
    """A type annotation in words ("a number", "an integer", "a list of strings", ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return f"a mapping of {_describe(args[1]).removeprefix('a ').removeprefix('an ')}s" if args else "a mapping"
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, "a value" if hint is Any else f"a {getattr(hint, '__name__', hint)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value has the annotated type: int is a float, bool is neither; lists for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def nested(cls: type) -> dict[str, type]:
    """The fields of `cls` that are sections of their own: field name -> config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _check(cls: type, values: dict[str, Any], where: str) -> None:
    """Unknown and missing keys, types and ranges of one section; ParamsError naming the first wrong key."""
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        unknown_keys = ", ".join(printable(str(k)) for k in unknown)
        raise ParamsError(f"{where}: unknown parameter(s) {unknown_keys}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    ranges: dict[str, Allowed] = getattr(cls, "RANGES", {})
    sections = nested(cls)
    for key, value in values.items():
        name = f"{where}.{key}"
        if key in sections:
            if not isinstance(value, dict):
                known = ", ".join(f.name for f in dataclasses.fields(sections[key]))
                raise ParamsError(f"{name} = {_shown(value)}: expected a mapping of {known}")
            _check(sections[key], value, name)
            continue
        if not _fits(value, hints[key]):
            rng = f" {ranges[key]}" if key in ranges and not ranges[key].choices else ""
            raise ParamsError(f"{name} = {_shown(value)}: expected {_describe(hints[key])}{rng}")
        if value is None:  # the type admits null (checked above): nothing to range-check
            continue
        allowed = ranges.get(key)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        if allowed is not None and not all(allowed.allows(v) for v in items):
            raise ParamsError(f"{name} = {_shown(value)}: expected {allowed}")
    required = [f.name for f in fields if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ParamsError(f"{where}: missing parameter(s) {', '.join(missing)} (params.yaml is their only home)")


def _build(cls: type[C], values: dict[str, Any], where: str) -> C:
    """The dataclass from checked values, nested sections first."""
    sections = nested(cls)
    built = {k: _build(sections[k], v, f"{where}.{k}") if k in sections else v for k, v in values.items()}
    try:
        return cls(**built)
    except (TypeError, ValueError) as e:  # a dataclass's own checks (__post_init__): one line, not a traceback
        raise ParamsError(f"{where}: {e}") from None


def config_from(cls: type[C], section: dict[str, Any] | None, *, at: str | None = None, **overrides: Any) -> C:
    """Build the frozen config dataclass `cls` from a params.yaml section, after checking its keys, types and ranges
    (see the module docstring). `at` names the section in messages (default: the class's SECTION, else its name)."""
    where = at or getattr(cls, "SECTION", cls.__name__)
    if section is not None and not isinstance(section, dict):
        known = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise ParamsError(f"{where} = {_shown(section)}: expected a mapping of {known}")
    values = {**(section or {}), **overrides}
    _check(cls, values, where)  # type: ignore[arg-type]
    return _build(cls, values, where)


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def section(params: dict[str, Any], dotted: str) -> dict[str, Any] | None:
    """params["ppo"]["kl_guard"] for "ppo.kl_guard"; None when absent."""
    node: Any = params
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def value(params: dict[str, Any], dotted: str) -> Any:
    """One value by its dotted key, as dvc.yaml names it (ppo.ensemble_penalty): what a stage reads from another
    stage's section; ParamsError when params.yaml lacks it."""
    *path, key = dotted.split(".")
    node = section(params, ".".join(path)) if path else params
    if not isinstance(node, dict) or key not in node:
        raise ParamsError(f"missing parameter {dotted} (params.yaml is its only home)")
    return node[key]


def defaults(cls: type[C], params_file: str | Path = PROJECT_PARAMS, **overrides: Any) -> C:
    """`cls` built from its SECTION of the project's own params.yaml (the one home of every value), with `overrides`
    merged in (nested sections key by key): what tests, benchmarks and callers without a params file build."""
    where: str = cls.SECTION  # type: ignore[attr-defined]
    return config_from(cls, _merged(section(load_params(params_file), where) or {}, overrides), at=where)


def load_config(cls: type[C], stage: str, path: str | Path = PARAMS_FILE, **overrides: Any) -> C:
    """The config of one stage, read from its section of params.yaml."""
    return config_from(cls, load_params(path).get(stage), at=stage, **overrides)

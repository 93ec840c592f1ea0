"""How a stage ends: one exit-code vocabulary for every caller (`rlhf run`, the Prefect flow, `dvc repro`, a container).

    0    OK           the stage did its work
    1    CRASH        a bug or a broken environment: the traceback is the report
    3    GATE         a gate stopped the pipeline on purpose (the reward model's agreement gate, the KL guard)
    4    NONFINITE    training diverged (a non-finite loss or reward); the last good checkpoint is intact
    64   USAGE        the command line is wrong (sysexits' EX_USAGE; argparse's own 2 is mapped to it)
    65   BAD_INPUT    the data or params.yaml is wrong: validation failed, a file is unreadable, a value out of range
    69   UNAVAILABLE  a service the command needs does not answer (a Prefect server, a Docker engine)
    75   BUSY         another run holds the project's DVC lock: nothing ran, try again (sysexits' EX_TEMPFAIL)
    130  INTERRUPTED  Ctrl-C

A stage that stops says why in one line on stderr and, when its caller asked for it (`RLHF_OUTCOME_FILE`), in a small
JSON file the caller made up fresh for this one run. So the reason is handed over explicitly, never read back from a
metrics file that may be a previous run's. `dvc repro` itself exits 255 for any failed stage; the stage's own code is in
DVC's message ("failed to run: python -m stages.X, exited with 3").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path

from stages.lib.escaping import printable

OUTCOME_ENV = "RLHF_OUTCOME_FILE"


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1
    GATE = 3
    NONFINITE = 4
    USAGE = 64
    BAD_INPUT = 65
    UNAVAILABLE = 69
    BUSY = 75
    INTERRUPTED = 130

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


class StageStop(Exception):
    """A stage ends on purpose with `code` and a one-line reason (not a crash: no traceback)."""

    code = ExitCode.CRASH

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GateFailed(StageStop):
    code = ExitCode.GATE


class BadInput(StageStop):
    code = ExitCode.BAD_INPUT


class NonFinite(StageStop):
    code = ExitCode.NONFINITE


class Unavailable(StageStop):
    code = ExitCode.UNAVAILABLE


class Busy(StageStop):
    """Something else holds what this run needs (the project's run lock, DVC's lock) or changed it under the run (a
    batch delivered while validation read the folder): nothing was written, run again."""

    code = ExitCode.BUSY


@dataclass(frozen=True)
class Outcome:
    """What a stage (or the pipeline) ended with: the exit code and, unless it is OK, the reason in one line."""

    stage: str
    code: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == ExitCode.OK

    @property
    def kind(self) -> str:
        try:
            return ExitCode(self.code).label
        except ValueError:
            return "crash"

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> Outcome | None:
        """The outcome a stage wrote to `path`, or None if it wrote none (it was skipped, or killed)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(str(data["stage"]), int(data["code"]), str(data.get("reason", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the vocabulary's usage code (64) instead of its own 2, which meant a gate here before."""

    def error(self, message: str):  # noqa: ANN201 (NoReturn)
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _report(outcome: Outcome) -> None:
    if path := os.environ.get(OUTCOME_ENV):
        try:
            outcome.write(path)
        except OSError as e:  # the stage's own exit code still says it
            print(f"warning: could not write the outcome to {path}: {e}", file=sys.stderr)


def stage_main(stage: str, main: Callable[[], int | None]) -> int:
    """Run a stage's `main()` and end it with the vocabulary's code: a `StageStop` (gate, bad input, non-finite)
    prints its reason in one line, anything else is a crash with its traceback. Returns the exit code."""
    try:
        code = int(main() or ExitCode.OK)
        outcome = Outcome(stage, code, "" if code == ExitCode.OK else f"{stage} exited {code}")
    except StageStop as e:
        print(f"{stage}: {printable(e.reason)}", file=sys.stderr)  # reasons quote data and file names
        outcome = Outcome(stage, e.code, e.reason)
    except KeyboardInterrupt:
        outcome = Outcome(stage, ExitCode.INTERRUPTED, "interrupted")
    except Exception as e:  # noqa: BLE001 (a crash: its traceback is the report, and the caller learns it crashed)
        traceback.print_exc()
        outcome = Outcome(stage, ExitCode.CRASH, f"{type(e).__name__}: {e}".splitlines()[0][:500])
    _report(outcome)
    return outcome.code

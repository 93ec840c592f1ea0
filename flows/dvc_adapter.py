"""The one place that reaches into DVC's private internals: `dvc repro --single-item <stage>` through DVC's Python API,
with the stage's commands run by a function of ours instead of DVC's shell.

DVC does everything `dvc repro --single-item` does (lock the repository, decide whether the stage changed, restore it
from the run cache, remove its outputs, run it, hash and cache the outputs, write dvc.lock); only
`dvc.stage.run.cmd_run`, which DVC calls (repository unlocked) to run a stage's commands, is swapped for the duration
of the call. That function and its helpers (`prepare_kwargs`, `_make_cmd`, `get_executable`) are not DVC's public API,
so this module checks DVC's version first: it was written and tested against `TESTED` (tests/test_dvc_adapter.py
fails loudly when the internals change). On another version `supported()` says why not, and the local runner falls
back to running `dvc repro --single-item` as a process of its own (flows/runners.py), which needs no internals.

Upgrading DVC: run `pytest tests/test_dvc_adapter.py tests/test_runners.py`; if they pass, add the version to
`TESTED`; if the internals moved, adapt `_run_commands` (README, "Upgrading DVC").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

TESTED = ("3.67.1",)
Command = Callable[[str, str, dict[str, str]], int]  # (command line, cwd, env) -> exit code


class Busy(Exception):
    """Another DVC process holds the repository lock (nothing ran)."""


class DvcFailed(Exception):
    """DVC itself failed (no such stage, a missing dependency, an output not written): the message says what."""


class CommandFailed(Exception):
    """The stage's command exited non-zero."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exited with {code}")
        self.code = code


def supported() -> str | None:
    """None when this DVC's internals are the ones this module was tested with, else why not (one line)."""
    try:
        import dvc
        from dvc.stage import run as dvc_run
    except ImportError as e:
        return f"DVC cannot be imported ({e})"
    if dvc.__version__ not in TESTED:
        return f"flows/dvc_adapter.py was tested with DVC {', '.join(TESTED)}, this is {dvc.__version__}"
    missing = [n for n in ("cmd_run", "prepare_kwargs", "_make_cmd", "get_executable") if not hasattr(dvc_run, n)]
    return f"dvc.stage.run lacks {', '.join(missing)}" if missing else None


class _ForwardDvcLog(logging.Handler):
    def __init__(self, echo: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        self.echo(record.getMessage())


@contextlib.contextmanager
def _dvc_logs_to(echo: Callable[[str], None]) -> Iterator[None]:
    """DVC's messages ("didn't change, skipping", "Updating lock file", errors) go to `echo` only, not also to the
    handlers `import dvc` gives its logger or to the root logger's."""
    log = logging.getLogger("dvc")
    saved = log.handlers[:], log.level, log.propagate
    log.handlers, log.level, log.propagate = [_ForwardDvcLog(echo)], logging.INFO, False
    try:
        yield
    finally:
        log.handlers, log.level, log.propagate = saved


@contextlib.contextmanager
def _run_commands(run: Command, env: dict[str, str], ran: list[str]) -> Iterator[None]:
    """Swap `dvc.stage.run.cmd_run` for one that hands each of a stage's commands to `run`, with DVC's cwd and
    environment for it (`env` plus DVC_ROOT and DVC_STAGE)."""
    from dvc.stage import run as dvc_run

    original = dvc_run.cmd_run

    def cmd_run(stage, dry: bool = False, run_env: dict[str, str] | None = None) -> None:  # noqa: ANN001
        if dry:
            return original(stage, dry=dry, run_env=run_env)
        ran.append(stage.addressing)
        for cmd in stage.cmd if isinstance(stage.cmd, list) else stage.cmd.splitlines():
            kwargs = dvc_run.prepare_kwargs(stage, run_env=env | (run_env or {}))
            if code := run(cmd, kwargs["cwd"], kwargs["env"]):
                raise CommandFailed(code)

    dvc_run.cmd_run = cmd_run
    try:
        yield
    finally:
        dvc_run.cmd_run = original


def shell_argv(cmd: str) -> list[str]:
    """The argv DVC would run `cmd` with (its shell, as `dvc repro` does)."""
    from dvc.stage import run as dvc_run

    return dvc_run._make_cmd(dvc_run.get_executable(), cmd)


def reproduce(project: Path, stage: str, run: Command, env: dict[str, str], echo: Callable[[str], None]) -> str:
    """`dvc repro --single-item stage` in `project`, each command given to `run`. Returns "ran", "restored" (from
    the run cache) or "skipped" (unchanged); raises Busy, CommandFailed or DvcFailed."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo

    ran: list[str] = []
    try:
        # DVC resolves targets and paths from the working directory, as its command line does
        with _dvc_logs_to(echo), _run_commands(run, env, ran), contextlib.chdir(project), Repo(str(project)) as repo:
            reproduced = repo.reproduce(stage, single_item=True)
    except LockError as e:
        raise Busy(str(e)) from None
    except DvcException as e:
        cause = e.__cause__
        if isinstance(cause, CommandFailed):
            raise cause from None
        raise DvcFailed(f"{e}: {cause}" if cause else str(e)) from None
    return ("ran" if ran else "restored") if reproduced else "skipped"

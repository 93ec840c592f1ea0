"""Run a stage's `python -m module args` in this interpreter instead of a new one, as a new process would run it.

A stage run as a process of its own pays ~6 s before its first step: the interpreter, the imports of torch,
transformers and mlflow (~4.5 s), DVC's start-up and the MLflow store (benchmarks/pipeline.py measured 42 s of the
default pipeline's 55 s of orchestration there). `run_module` runs it with `runpy`: in the stage's directory, with the
given environment, the directory first on `sys.path`. Afterwards the working directory, environment, `sys.argv`,
`sys.path`, torch's thread count, accelerate's process-wide state and MLflow's active runs are put back, so the next
stage starts as it would in a fresh process. When the module's package is in the stage's directory (as `stages/` is),
its modules are imported afresh from there for the stage and the caller's are put back afterwards: the code that runs
is the code DVC hashes, even if it changed since this process started or belongs to another checkout than the flow's.

What in-process gives up: a stage that kills its process (a segfault, the OOM killer) takes the caller with it.
`--runner process` gives each stage a process of its own.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

# `python -m pkg.module args`: nothing a shell would interpret (pipes, redirections, variables, globs, chains)
PYTHON_MODULE = re.compile(r"python3?(?:\.\d+)?\s+-m\s+[A-Za-z_][\w.]*(?:\s+[\w./:=,@%+-]+)*")
TAIL = 40  # lines of output kept for the error message
PROGRESS = re.compile(r"\d+%\|")  # a tqdm frame: a progress bar arrives one \r-frame per line
Echo = Callable[[str], None]
# A stage module the caller imported already (the CLI imports stages.validate) runs afresh as __main__ all the same;
# runpy's warning about it is for code that expects one module object.
warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning, "runpy")


class Lines:
    """An `echo` that drops blank lines and a progress bar's frames but its last, and keeps the last `TAIL` lines."""

    def __init__(self, echo: Echo) -> None:
        self.echo, self.tail = echo, collections.deque[str](maxlen=TAIL)

    def __call__(self, line: str) -> None:
        if (line := line.rstrip()) and not (PROGRESS.search(line) and "100%|" not in line):
            self.echo(line)
            self.tail.append(line)


class LineWriter(io.TextIOBase):
    """A text stream that hands each line (ended by `\\n`, or by a progress bar's `\\r`) to `echo`."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, echo: Echo) -> None:
        self.echo, self.pending, self.busy = echo, "", False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if self.busy:  # `echo` itself printed: to the real stream, not round in a loop
            return sys.__stderr__.write(text) if sys.__stderr__ else len(text)
        *lines, self.pending = re.split(r"[\r\n]", self.pending + text)
        self.busy = True
        try:
            for line in lines:
                self.echo(line)
        finally:
            self.busy = False
        return len(text)

    def flush(self) -> None:
        if self.pending and not self.busy:
            line, self.pending = self.pending, ""
            self.write(line + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# One command
# ---------------------------------------------------------------------------------------------------------------------


def python_module(cmd: str) -> list[str] | None:
    """`[module, *args]` when `cmd` is exactly `python -m module args...`; None for anything a shell must run."""
    return shlex.split(cmd)[2:] if PYTHON_MODULE.fullmatch(cmd.strip()) else None


def _local_package(module: str, cwd: str) -> str | None:
    """The top-level package of `module` when `python -m module` in `cwd` would import it from `cwd`."""
    top = module.split(".")[0]
    return top if (Path(cwd) / top).is_dir() or (Path(cwd) / f"{top}.py").is_file() else None


@contextlib.contextmanager
def _fresh_modules(top: str | None) -> Iterator[None]:
    """The stage imports `top` and its submodules afresh (from the stage's directory, first on sys.path); the caller's
    modules of that package are put back afterwards."""
    if top is None:
        yield
        return
    mine = lambda name: name == top or name.startswith(top + ".")  # noqa: E731
    saved = {name: mod for name, mod in sys.modules.items() if mine(name)}
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [n for n in sys.modules if mine(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _active_run_id() -> str | None:
    """The caller's active MLflow run, which a stage's runs nest in and must not end."""
    if "mlflow" not in sys.modules:
        return None
    import mlflow

    return run.info.run_id if (run := mlflow.active_run()) else None


def _reset_process_state(active_run: str | None) -> None:
    """Undo what a stage leaves process-wide that a process of its own would have taken with it."""
    if "accelerate.state" in sys.modules:  # Accelerator() refuses a second, different configuration otherwise
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if "mlflow" in sys.modules:  # a run the stage left open (it crashed outside its `with mlflow.start_run()`)
        import mlflow

        while (run := mlflow.active_run()) is not None and run.info.run_id != active_run:
            mlflow.end_run("FAILED")
    gc.collect()  # the stage's models go now, not at some later collection
    with contextlib.suppress(OSError, AttributeError):  # and glibc hands the freed memory back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _set_environ(env: dict[str, str]) -> None:
    """Make os.environ equal `env` without emptying it on the way (other threads may read it)."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)


def _to_stderr(line: str) -> None:
    print(line, file=sys.__stderr__)


# One stream for every stage: a logging handler or progress bar a stage creates keeps it (transformers binds its
# handler to the sys.stderr of its first import), so it must lead to whichever stage runs now, and to stderr between.
_STREAM = LineWriter(_to_stderr)


def run_module(module: str, args: list[str], cwd: str, env: dict[str, str], echo: Echo) -> int:
    """`python -m module args` in this interpreter; its exit code (1 for an uncaught exception, whose traceback goes to
    `echo` as it would go to stderr)."""
    try:
        import torch  # every stage but validation imports it: imported here to put back a thread count a stage sets
    except ImportError:
        torch = None
    saved = dict(os.environ), sys.argv[:], sys.path[:], os.getcwd(), torch.get_num_threads() if torch else 0
    active_run = _active_run_id()
    _STREAM.flush()
    _STREAM.echo = echo
    try:
        _set_environ(env)
        os.chdir(cwd)
        sys.argv[:], sys.path[:] = [module, *args], [cwd, *sys.path]
        with (
            contextlib.redirect_stdout(_STREAM),
            contextlib.redirect_stderr(_STREAM),
            _fresh_modules(_local_package(module, cwd)),
        ):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # `raise SystemExit(main())`, argparse, sys.exit("message")
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:  # a crash: the traceback is the stage's output, as in a process of its own
                traceback.print_exc()
                code = 1
            _STREAM.flush()
        return code
    finally:
        _STREAM.echo = _to_stderr
        environ, sys.argv[:], sys.path[:], cwd_before, threads = saved
        _set_environ(environ)
        os.chdir(cwd_before)
        if torch:
            torch.set_num_threads(threads)
        try:
            _reset_process_state(active_run)
        except Exception as e:  # noqa: BLE001 (the stage's own outcome stands; say what could not be undone)
            _to_stderr(f"warning: after {module}: could not reset process state: {e!r}")


_ONE_AT_A_TIME = threading.Lock()


def one_at_a_time() -> threading.Lock:
    """Held while a stage runs in this process: a stage owns the working directory and the environment."""
    return _ONE_AT_A_TIME


def run_command(cmd: list[str], cwd: str, env: dict[str, str], echo: Echo) -> int:
    """A command in a new process, stdout and stderr handed to `echo` line by line; its exit code."""
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line)
    return proc.returncode

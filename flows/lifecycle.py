"""What a pipeline command owns while it runs, and gives back however it ends (even `kill -9`):

- **one run per checkout**: a lock file (`.rlhf/run.lock`, flock) held for the whole command, and by the pipeline flow
  itself (a worker's or `rlhf serve`'s flow run); a second `rlhf run`, or a scheduled run arriving while one is still
  going, in the same project says who holds it and ends busy (exit 75) instead of racing the first over DVC and the
  registry;
- **a temporary Prefect server that dies with its command**: without PREFECT_API_URL, Prefect would start its own
  temporary server as a child that a SIGKILLed parent leaves behind (an orphaned uvicorn per killed nightly run). This
  starts the same server (the command Prefect's `SubprocessASGIServer` runs) with `PR_SET_PDEATHSIG`, so the kernel
  stops it when the command dies for any reason, waits for it as long as a busy machine needs (not 20 s), and stops it
  on the way out;
- **no run left RUNNING**: a killed command cannot end its MLflow runs. Every run records its host and process id
  (stages/lib/tracking.py); before a pipeline starts, runs still RUNNING whose process on this host is gone are ended
  KILLED, so the UI and the registry never show a dead run as running, and the pipeline's Prefect flow run, still
  Running on a shared server, is set Crashed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from stages.lib.outcome import Busy, ExitCode, StageStop

STARTUP_SECONDS = 180.0  # a cold start on a loaded 2-core machine took over Prefect's default 20 s
PR_SET_PDEATHSIG = 1


class ServerDidNotStart(StageStop):
    code = ExitCode.UNAVAILABLE


_HELD: dict[Path, int] = {}  # the run locks this process holds (flock conflicts with a second open file of its own)


@contextlib.contextmanager
def project_lock(project: Path) -> Iterator[None]:
    """Hold the project's run lock for the block; another holder makes this raise `Busy` at once. Re-entrant in one
    process: `rlhf run --prefect` holds it and the flow it runs takes it again (a worker's flow run takes it alone)."""
    path = (project / ".rlhf" / "run.lock").resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"another rlhf run is running in {project} ({holder}); wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            fcntl.flock(f, fcntl.LOCK_UN)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temporary_prefect_server(timeout: float = STARTUP_SECONDS) -> Iterator[str]:
    """Prefect's temporary server (SQLite under PREFECT_HOME, no UI) as a child that cannot outlive this process;
    yields its API URL. Raises `ServerDidNotStart` (one line) if it does not answer within `timeout`."""
    import prefect

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(Path(prefect.__file__).parent.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]  # what prefect.server.api.server.SubprocessASGIServer runs
    server = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509 (only prctl, async-safe)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise ServerDidNotStart(f"Prefect's temporary server exited with {server.returncode} while starting")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=5) as r:  # noqa: S310
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerDidNotStart(
                    f"Prefect's temporary server did not answer within {timeout:.0f} s; set "
                    "PREFECT_API_URL to a running `prefect server start` (or `rlhf stack up`)"
                )
            time.sleep(0.5)
        yield url
    finally:
        _send_pending_logs()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _send_pending_logs() -> None:
    """The flow's last log lines go to the temporary server before it stops; otherwise Prefect's log worker finds it
    gone at exit and prints "--- Error logging to API --- All connection attempts failed" after a good run."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(tracking_uri: str, experiment: str) -> list[str]:
    """End KILLED the runs still RUNNING whose process (tags rlhf.host, rlhf.pid) on this host no longer exists;
    returns their ids. Runs of other hosts are left to those hosts."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host, closed = socket.gethostname(), []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("rlhf.pid", "")
        if tags.get("rlhf.host") == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "rlhf.outcome", "killed")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
            if flow_run_id := tags.get("prefect.flow_run_id"):  # the pipeline's flow run died with the same process
                crash_flow_run(flow_run_id, f"its process (pid {pid} on {host}) was killed")
    return closed


def crash_flow_run(flow_run_id: str, why: str) -> bool:
    """Set a Prefect flow run still Running to Crashed on PREFECT_API_URL's server (a killed process cannot report
    its own end, and a shared server would show it Running forever); True if it was. A server that does not know the
    run (a temporary one, gone with the killed command) or cannot be reached changes nothing."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Crashed

    if not PREFECT_API_URL.value():
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state is None or not state.is_running():
                return False
            client.set_flow_run_state(UUID(flow_run_id), Crashed(message=f"Crashed: {why}"), force=True)
            return True
    except Exception:  # noqa: BLE001 (unknown run, not an id, or the server is away: nothing to end)
        return False

"""`rlhf stack up | down | status | env | remote | restart`: the services a team runs this pipeline against, started
on this machine by one command, the way they run on a team's servers.

    service     what                                                      default address
    postgres    PostgreSQL (Debian's initdb/pg_ctl), the database of both  127.0.0.1:5433 (databases prefect, mlflow)
                servers, run as a non-root user
    prefect     `prefect server start` on PostgreSQL (asyncpg): API + UI   http://127.0.0.1:4200
    mlflow      `mlflow server` on PostgreSQL; artifacts go through it     http://127.0.0.1:5000
                (--serve-artifacts), so clients need no shared filesystem
    worker      `prefect worker start --pool rlhf-process`: runs           (prefect.yaml's rlhf-process deployment,
                prefect.yaml's deployment                                  registered by `up` from the project)
    dvc-remote  Debian's sshd, key login only, as the non-root user: the   ssh://rlhf-stack@127.0.0.1:2222/<dir>/dvc-remote
                project's DVC remote (dvc-ssh)
    label-studio  only with --label-studio: Label Studio 1.23 on the       http://127.0.0.1:8080
                same PostgreSQL (database labelstudio), in a venv of its own (it pins its own Django), for the
                comparisons stage's human rounds; its admin's API token is in <dir>/secrets/label_studio_token

Everything listens on loopback unless --host says otherwise. Ports, the folder (`--dir`, default
`<project>/.rlhf/stack`) and the database credentials are flags or RLHF_STACK_* variables; the generated database
password and the SSH key live in `<dir>/secrets/` (mode 0600). `up` is idempotent: a service that answers is left
alone, one that does not is started and polled until healthy (no fixed sleeps; a slow machine just waits longer).
`down` stops every process `up` recorded (and their children), nothing else. `stack.json` in the folder records the
configuration and the processes.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from stages.lib.environment import quiet
from stages.lib.outcome import StageStop, Unavailable

SERVICES = ("postgres", "prefect", "mlflow", "worker", "dvc-remote")
OPTIONAL = ("label-studio",)  # part of the stack once `up --label-studio` (or a port) asked for it
SERVICE_USER = "rlhf-stack"  # the OS user PostgreSQL and sshd run as when `up` runs as root (initdb refuses root)
DATABASES = ("prefect", "mlflow")
LABEL_STUDIO = "label-studio==1.23.2"  # installed into a venv of its own (shared/ENVIRONMENT.md: ~1-2 min)
LABEL_STUDIO_ADMIN = "rlhf-admin@localhost"  # the account `up` creates; its password and API token are secrets
STATE_FILE = "stack.json"
DEFAULT_TIMEOUT = 600.0  # seconds a service may take to become healthy: a loaded 2-core machine is slow, not broken


class StackError(StageStop):
    """The stack cannot do what was asked (a service did not come up, a folder the service user cannot reach)."""

    code = Unavailable.code


@dataclass(frozen=True)
class StackConfig:
    """Where the stack lives and listens. Every field has a flag and an RLHF_STACK_<FIELD> variable."""

    dir: str = ""  # default: <project>/.rlhf/stack
    host: str = "127.0.0.1"  # the address every service binds to: loopback unless you mean to serve a network
    pg_port: int = 5433  # not 5432, so a system PostgreSQL can run beside it
    prefect_port: int = 4200
    mlflow_port: int = 5000
    ssh_port: int = 2222
    db_user: str = "rlhf"  # the PostgreSQL role both servers connect as (its password: <dir>/secrets/db_password)
    user: str = ""  # the OS user of PostgreSQL and sshd: this user, or rlhf-stack (created) when run as root
    pool: str = "rlhf-process"  # the Prefect work pool the worker serves (prefect.yaml's process deployment)
    label_studio_port: int = 0  # Label Studio's port; 0: no Label Studio in this stack (`up --label-studio`: 8080)

    @property
    def home(self) -> Path:
        return Path(self.dir)

    @property
    def connect_host(self) -> str:
        """The address clients use: the bound one, or loopback when the services bind every interface."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def prefect_url(self) -> str:
        return f"http://{self.connect_host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.connect_host}:{self.mlflow_port}"

    @property
    def remote_url(self) -> str:
        return f"ssh://{self.user}@{self.connect_host}:{self.ssh_port}{self.home.resolve() / 'dvc-remote'}"

    @property
    def label_studio_url(self) -> str:
        return f"http://{self.connect_host}:{self.label_studio_port}"

    @property
    def services(self) -> tuple[str, ...]:
        return SERVICES + (("label-studio",) if self.label_studio_port else ())

    @property
    def databases(self) -> tuple[str, ...]:
        return DATABASES + (("labelstudio",) if self.label_studio_port else ())

    def db_url(self, database: str, password: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{self.db_user}:{password}@{self.connect_host}:{self.pg_port}/{database}"


def config_from(project: Path, overrides: dict[str, Any] | None = None) -> StackConfig:
    """The stack's configuration: the saved one (if the stack was set up), RLHF_STACK_* variables, then `overrides`
    (command-line flags; None values are ignored)."""
    folder = (overrides or {}).get("dir") or os.environ.get("RLHF_STACK_DIR") or str(project / ".rlhf" / "stack")
    saved = _read_state(Path(folder)).get("config", {})
    values: dict[str, Any] = {**saved, "dir": str(Path(folder).resolve())}
    for f in fields(StackConfig):
        if (env := os.environ.get(f"RLHF_STACK_{f.name.upper()}")) and f.name != "dir":
            values[f.name] = int(env) if f.type == "int" else env
    values |= {k: v for k, v in (overrides or {}).items() if v is not None and k != "dir"}
    values["user"] = values.get("user") or (SERVICE_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)
    return StackConfig(**{f.name: values[f.name] for f in fields(StackConfig) if f.name in values})


# ---------------------------------------------------------------------------------------------------------------------
# State: the configuration and the processes `up` started, in <dir>/stack.json
# ---------------------------------------------------------------------------------------------------------------------


def _read_state(home: Path) -> dict[str, Any]:
    try:
        return json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(config: StackConfig, procs: dict[str, list[int]]) -> None:
    state = {"config": asdict(config), "procs": procs, "urls": urls(config)}
    tmp = config.home / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(config.home / STATE_FILE)


def urls(config: StackConfig) -> dict[str, str]:
    """What a client needs: the two servers' URLs and the DVC remote."""
    return {
        "MLFLOW_TRACKING_URI": config.mlflow_url,
        "PREFECT_API_URL": config.prefect_api_url,
        "prefect_ui": config.prefect_url,
        "mlflow_ui": config.mlflow_url,
        "dvc_remote": config.remote_url,
        "dvc_keyfile": str(config.home.resolve() / "secrets" / "dvc_ssh_key"),
    } | ({"LABEL_STUDIO_URL": config.label_studio_url} if config.label_studio_port else {})


def training_view(mlflow_url: str, run_id: str | None = None, experiment: str = "rlhf") -> str:
    """The MLflow UI's page of the run (or of the experiment) in its "Model training" view. MLflow 3.17's UI keeps a
    GenAI / Model training switch per browser that starts on GenAI, whatever the experiment's kind, and then opens an
    experiment on its traces overview ("Traces 0"); a link with ?workflowType=machine_learning opens the runs."""
    base, view = mlflow_url.rstrip("/"), "?workflowType=machine_learning"
    query = f"runs/get?run_id={run_id}" if run_id else f"experiments/get-by-name?experiment_name={experiment}"
    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{query}", timeout=10) as r:
            found = json.loads(r.read())
    except (OSError, urllib.error.URLError, ValueError):  # no such run or experiment yet, or the server is away
        return f"{base}/#/experiments{view}"
    if run_id:
        return f"{base}/#/experiments/{found['run']['info']['experiment_id']}/runs/{run_id}{view}"
    return f"{base}/#/experiments/{found['experiment']['experiment_id']}{view}"


def client_env(project: Path, stack_dir: str | None = None) -> dict[str, str]:
    """MLFLOW_TRACKING_URI and PREFECT_API_URL of the running stack (`rlhf run --stack`); Unavailable if it is down."""
    config = config_from(project, {"dir": stack_dir})
    if not _read_state(config.home):
        raise Unavailable(f"no stack in {config.home}: start one with `rlhf stack up` (or pass --stack-dir)")
    down = [name for name in ("prefect", "mlflow") if not HEALTH[name](config)]
    if down:
        raise Unavailable(
            f"the stack in {config.home} is not answering ({', '.join(down)} down): "
            "`rlhf stack up` starts what is missing, `rlhf stack status` shows what runs"
        )
    return {"MLFLOW_TRACKING_URI": config.mlflow_url, "PREFECT_API_URL": config.prefect_api_url}


# ---------------------------------------------------------------------------------------------------------------------
# Processes: started in their own session, recorded with their start time (so a recycled pid is never signalled)
# ---------------------------------------------------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return None if rest[0] in ("Z", "X") else int(rest[19])


def _alive(proc: list[int] | None) -> bool:
    return bool(proc) and _start_time(proc[0]) == proc[1]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (a Prefect worker's flow-run processes may lead sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents.setdefault(int(text[text.rindex(")") + 2 :].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_process(proc: list[int], grace: float = 30.0) -> None:
    """SIGTERM the process's group and every descendant, SIGKILL whatever is left after `grace` seconds."""
    if not _alive(proc):
        return
    victims = [(p, _start_time(p)) for p in [proc[0], *_children(proc[0])]]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in victims:
            if start is not None and _start_time(pid) == start:
                with suppress(ProcessLookupError, PermissionError):  # it ended meanwhile
                    if pid == proc[0]:
                        os.killpg(pid, sig)  # the session `up` started it in
                    else:
                        os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(s is not None and _start_time(p) == s for p, s in victims):
            time.sleep(0.2)
        if not any(s is not None and _start_time(p) == s for p, s in victims):
            return


def _as_user(config: StackConfig) -> dict[str, Any]:
    """Popen arguments that run a command as the stack's service user (nothing when that is who we are)."""
    entry = pwd.getpwnam(config.user)
    if entry.pw_uid == os.geteuid():
        return {}
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _spawn(
    config: StackConfig,
    procs: dict[str, list[int]],
    name: str,
    cmd: list[str],
    env: dict[str, str],
    as_service_user: bool = False,
) -> None:
    """Start `cmd` in a session of its own, its output in <dir>/logs/<name>.log, and record it."""
    log = config.home / "logs" / f"{name}.log"
    with log.open("ab") as f:
        f.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=config.home,
            start_new_session=True,
            **(_as_user(config) if as_service_user else {}),
        )
    procs[name] = [proc.pid, _start_time(proc.pid) or 0]
    _write_state(config, procs)


def _wait(config: StackConfig, name: str, procs: dict[str, list[int]], timeout: float) -> float:
    """Poll `name`'s health until it answers; fail at once with its log's tail if its process died."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if HEALTH[name](config):
            return time.monotonic() - start
        if name in procs and not _alive(procs[name]):
            raise StackError(f"{name} exited while starting; the end of its log:\n{_tail(config, name)}")
        time.sleep(1)
    raise StackError(
        f"{name} did not answer within {timeout:.0f} s (RLHF_STACK_TIMEOUT); the end of its log:\n"
        f"{_tail(config, name)}\n`rlhf stack down` stops what did start"
    )


def _tail(config: StackConfig, name: str, n: int = 15) -> str:
    log = config.home / ("postgres/postgres.log" if name == "postgres" else f"logs/{name}.log")
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {log})"


# ---------------------------------------------------------------------------------------------------------------------
# Health: each service's own answer (HTTP health endpoints, a database connection, an SSH banner)
# ---------------------------------------------------------------------------------------------------------------------


def _http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def pg_connect(config: StackConfig, dbname: str = "postgres") -> Any:
    """A psycopg connection to the stack's PostgreSQL as its database role (a context manager that closes it)."""
    import psycopg

    return psycopg.connect(
        host=config.connect_host,
        port=config.pg_port,
        user=config.db_user,
        dbname=dbname,
        password=_password(config),
        connect_timeout=5,
    )


def _postgres_ok(config: StackConfig) -> bool:
    try:
        pg_connect(config).close()
        return True
    except Exception:  # noqa: BLE001 (not up, not yet accepting, or wrong credentials: not healthy)
        return False


def _worker_ok(config: StackConfig) -> bool:
    """The pool has a worker the server has heard from lately (status ONLINE)."""
    body = json.dumps({"limit": 50}).encode()
    request = urllib.request.Request(
        f"{config.prefect_api_url}/work_pools/{config.pool}/workers/filter",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return any(w.get("status") == "ONLINE" for w in json.loads(r.read()))
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _ssh_ok(config: StackConfig) -> bool:
    try:
        with socket.create_connection((config.connect_host, config.ssh_port), timeout=5) as s:
            return s.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


HEALTH: dict[str, Callable[[StackConfig], bool]] = {
    "postgres": _postgres_ok,
    "prefect": lambda c: _http_ok(f"{c.prefect_api_url}/health"),
    "mlflow": lambda c: _http_ok(f"{c.mlflow_url}/health"),
    "worker": _worker_ok,
    "dvc-remote": _ssh_ok,
    "label-studio": lambda c: _http_ok(f"{c.label_studio_url}/health"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Set-up: the service user, folders it owns, the database password and the SSH keys
# ---------------------------------------------------------------------------------------------------------------------


# the programs the stack runs, where Debian puts them, and the Debian package of each
PROGRAMS = {
    "initdb": ("/usr/lib/postgresql/*/bin", "postgresql"),
    "pg_ctl": ("/usr/lib/postgresql/*/bin", "postgresql"),
    "sshd": ("/usr/sbin", "openssh-server"),
    "ssh-keygen": ("/usr/bin", "openssh-server"),  # openssh-client, which openssh-server brings
}
INSTALLER = Path(__file__).resolve().parents[1] / "docker/debian-packages.sh"  # waits for the apt lock


def _find(name: str, *folders: str) -> str | None:
    """A program from PATH or the folders Debian installs it in (PostgreSQL's server tools are not on PATH there)."""
    candidates = [p for folder in folders for p in sorted(Path("/").glob(f"{folder.lstrip('/')}/{name}"), reverse=True)]
    return shutil.which(name) or next((str(p) for p in candidates if os.access(p, os.X_OK)), None)  # newest version


def _tool(name: str, *folders: str) -> str:
    found = _find(name, *folders)
    if not found:
        raise StackError(f"{name} is not installed: {install_command(missing_packages())}")
    return found


def missing_packages() -> list[str]:
    """The Debian packages whose programs the stack runs and this machine lacks."""
    return sorted({package for name, (folder, package) in PROGRAMS.items() if not _find(name, folder)})


def install_command(packages: list[str]) -> str:
    return f"sudo {INSTALLER} {' '.join(packages)}   (or: sudo apt-get install {' '.join(packages)})"


def install_missing(echo: Callable[[str], None] = print) -> list[str]:
    """Install the Debian packages the stack needs and lacks, as root (waiting for the apt lock, as CI and the test
    fixtures do), the way PostgreSQL and sshd come to a fresh machine; not root: one line with the exact command."""
    missing = missing_packages()
    if not missing:
        return []
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(
            f"the stack needs Debian's {', '.join(missing)}, not installed here: {install_command(missing)}"
        )
    echo(f"installing Debian's {', '.join(missing)} (waits for the apt lock; a minute or two)")
    done = subprocess.run([str(INSTALLER), *missing], capture_output=True, text=True, timeout=1800)
    if done.returncode or missing_packages():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise StackError(f"installing Debian's {', '.join(missing)} failed: {' | '.join(tail) or 'no output'}")
    return missing


def _ensure_user(config: StackConfig) -> None:
    """Create the service user (a system account without a login shell or password) when running as root."""
    try:
        pwd.getpwnam(config.user)
        return
    except KeyError:
        if os.geteuid() != 0:
            raise StackError(f"no OS user {config.user!r}: create it, or run as root to have `up` create it") from None
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            config.user,
        ],
        check=True,
        capture_output=True,
    )
    # sshd (without PAM) refuses a locked account ("!" in /etc/shadow); "*" means "no password", not locked
    subprocess.run(["usermod", "-p", "*", config.user], check=True, capture_output=True)


def _owned_dir(config: StackConfig, path: Path, mode: int = 0o700) -> Path:
    """A folder only the service user can use; fails clearly when that user cannot reach it (a private parent)."""
    path.mkdir(parents=True, exist_ok=True)
    entry = pwd.getpwnam(config.user)
    if os.geteuid() == 0:
        os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)
    probe = subprocess.run(["test", "-w", str(path)], **_as_user(config))  # type: ignore[call-overload]
    if probe.returncode:
        raise StackError(
            f"{path} is not reachable by the service user {config.user!r} (a parent folder is private): "
            "choose a folder it can reach with --dir or RLHF_STACK_DIR"
        )
    return path


def _password(config: StackConfig) -> str:
    """The database password: RLHF_STACK_DB_PASSWORD, else the one generated at the first `up`."""
    if env := os.environ.get("RLHF_STACK_DB_PASSWORD"):
        return env
    return secret(config, "db_password", lambda: secrets.token_urlsafe(24))


def secret(config: StackConfig, name: str, make: Callable[[], str]) -> str:
    """<dir>/secrets/<name> (mode 0600), made by `make` the first time it is asked for."""
    path = config.home / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600)
        path.write_text(make())
    return path.read_text().strip()


def label_studio_token(config: StackConfig) -> str:
    """The API token of the stack's Label Studio admin (a legacy token: `Authorization: Token <it>`)."""
    return secret(config, "label_studio_token", lambda: secrets.token_hex(20))


def _ssh_keys(config: StackConfig) -> None:
    """sshd's host key (the service user's) and the client key `dvc` logs in with (ours), generated once."""
    ssh, keys = config.home / "ssh", config.home / "secrets"
    keygen = _tool("ssh-keygen", "/usr/bin")
    if not (keys / "dvc_ssh_key").exists():
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "rlhf-stack dvc", "-f", str(keys / "dvc_ssh_key")],
            check=True,
        )
    if not (ssh / "host_ed25519").exists():
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "host_ed25519")], check=True, **_as_user(config)
        )
    authorized = ssh / "authorized_keys"
    authorized.write_text((keys / "dvc_ssh_key.pub").read_text())
    _chown(config, authorized)
    authorized.chmod(0o600)


def _chown(config: StackConfig, path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(config.user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _server_env(config: StackConfig, extra: dict[str, str]) -> dict[str, str]:
    """A server's environment: ours without client settings, telemetry off, the venv's tools first on PATH."""
    env = quiet(dict(os.environ))
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RLHF_PARENT_RUN_ID", "PREFECT_PROFILE"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PREFECT_HOME": str(config.home / "prefect"), "PYTHONUNBUFFERED": "1", **extra}


# ---------------------------------------------------------------------------------------------------------------------
# Starting each service
# ---------------------------------------------------------------------------------------------------------------------


def _start_postgres(config: StackConfig, procs: dict[str, list[int]]) -> None:
    """initdb once (the service user, scram-sha-256 passwords), pg_ctl start on loopback, the two databases."""
    pg = _owned_dir(config, config.home / "postgres")
    data, run = pg / "data", pg / "run"
    if not (data / "PG_VERSION").exists():
        pwfile = pg / "pwfile"
        pwfile.write_text(_password(config))
        _chown(config, pwfile)
        done = subprocess.run(
            [
                _tool("initdb", "/usr/lib/postgresql/*/bin"),
                "-D",
                str(data),
                "-U",
                config.db_user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
            ],
            capture_output=True,
            text=True,
            cwd=pg,
            **_as_user(config),
        )
        pwfile.unlink()
        if done.returncode:
            raise StackError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
    run.mkdir(exist_ok=True)
    _chown(config, run)
    options = f"-p {config.pg_port} -c listen_addresses='{config.host}' -k '{run}'"
    done = subprocess.run(
        [
            _tool("pg_ctl", "/usr/lib/postgresql/*/bin"),
            "start",
            "-D",
            str(data),
            "-l",
            str(pg / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(int(_timeout())),
        ],
        capture_output=True,
        text=True,
        cwd=pg,
        **_as_user(config),
    )
    if done.returncode:
        raise StackError(
            f"PostgreSQL did not start: {done.stdout.strip()} {done.stderr.strip()}\n{_tail(config, 'postgres')}"
        )
    _wait(config, "postgres", procs, _timeout())
    _create_databases(config)


def _create_databases(config: StackConfig) -> None:
    import psycopg

    with psycopg.connect(
        host=config.connect_host,
        port=config.pg_port,
        user=config.db_user,
        dbname="postgres",
        password=_password(config),
        connect_timeout=30,
        autocommit=True,
    ) as conn:
        for name in config.databases:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')


def _start_prefect(config: StackConfig, procs: dict[str, list[int]]) -> None:
    env = _server_env(
        config,
        {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": config.db_url("prefect", _password(config), "postgresql+asyncpg"),
            # the UI calls this API address (else http://127.0.0.1:4200/api, whatever the port: shared/ENVIRONMENT.md)
            "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL", config.prefect_api_url),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # no server-side prepared statements kept per pooled connection (what Prefect documents for PgBouncer):
            # with SQLAlchemy's and asyncpg's defaults each of the pool's PostgreSQL backends keeps the plans of up to
            # 100 statements, and batched log and event inserts are a new statement per batch size, so each backend
            # grew by up to ~10 MB over a night (benchmarks/night.py); planning these queries costs far less
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_STATEMENT_CACHE_SIZE": "0",
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_PREPARED_STATEMENT_CACHE_SIZE": "0",
        },
    )
    _spawn(
        config,
        procs,
        "prefect",
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            config.host,
            "--port",
            str(config.prefect_port),
        ],
        env,
    )


def _start_mlflow(config: StackConfig, procs: dict[str, list[int]]) -> None:
    artifacts = config.home / "mlartifacts"
    artifacts.mkdir(exist_ok=True)
    # the store URI (with the password) in the environment, not on the command line every `ps` shows
    env = _server_env(
        config,
        {
            "MLFLOW_BACKEND_STORE_URI": config.db_url("mlflow", _password(config)),
            # MLflow 3's server-side GenAI jobs (scorers, trace roll-ups): 7 processes, ~1.9 GB,
            # unused by this pipeline
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # a connection per request, closed after it: SQLAlchemy's default pool (per worker and per store) keeps
            # every connection a burst of logging opened, so the count crept up run after run (11 idle -> 18 over a
            # night, benchmarks/night.py) and each kept backend holds its own memory; a tracking server's request
            # rate is low, a connection costs milliseconds
            "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
        },
    )
    _spawn(
        config,
        procs,
        "mlflow",
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            config.host,
            "--port",
            str(config.mlflow_port),
            "--serve-artifacts",
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "2",
        ],
        env,
    )


def _start_worker(config: StackConfig, procs: dict[str, list[int]]) -> None:
    """The process worker: flow runs start as processes of this venv's Python, logging to the stack's MLflow."""
    env = _server_env(
        config,
        # RLHF_STACK_DIR: a flow run finds this stack's Label Studio and its token (flows/labelling.py)
        {"PREFECT_API_URL": config.prefect_api_url, "MLFLOW_TRACKING_URI": config.mlflow_url,
         "RLHF_STACK_DIR": str(config.home)},
    )  # fmt: skip
    _spawn(
        config,
        procs,
        "worker",
        [
            str(Path(sys.executable).parent / "prefect"),
            "worker",
            "start",
            "--pool",
            config.pool,
            "--type",
            "process",
            "--limit",
            "1",
        ],
        env,
    )


def _start_sshd(config: StackConfig, procs: dict[str, list[int]]) -> None:
    """sshd as the service user: it can log in only that user, by key, for SFTP (what dvc-ssh speaks)."""
    ssh = _owned_dir(config, config.home / "ssh")
    _owned_dir(config, config.home / "dvc-remote", 0o755)
    _ssh_keys(config)
    (ssh / "sshd_config").write_text(f"""\
# written by `rlhf stack up`: the DVC remote, key login only, loopback by default
Port {config.ssh_port}
ListenAddress {config.host}
HostKey {ssh / "host_ed25519"}
PidFile {ssh / "sshd.pid"}
AuthorizedKeysFile {ssh / "authorized_keys"}
AllowUsers {config.user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTTY no
# the key files sit in the stack's folder, whose parents the service user does not own
StrictModes no
# in sshd itself: an external sftp-server would start through the user's shell, which is nologin
Subsystem sftp internal-sftp
""")
    _chown(config, ssh / "sshd_config")
    _spawn(
        config,
        procs,
        "dvc-remote",
        [_tool("sshd", "/usr/sbin"), "-D", "-e", "-f", str(ssh / "sshd_config")],
        _server_env(config, {}),
        as_service_user=True,
    )


def label_studio_venv() -> Path:
    """Label Studio's own venv: RLHF_LABEL_STUDIO_VENV, else one per version in the user's cache, shared by every
    stack of this user (it pins its own Django and pydantic: never the project's environment)."""
    default = Path.home() / ".cache" / "rlhf" / LABEL_STUDIO.replace("==", "-")
    return Path(os.environ.get("RLHF_LABEL_STUDIO_VENV") or default)


def install_label_studio(echo: Callable[[str], None] = print) -> Path:
    """The `label-studio` command of its venv, installed from PyPI the first time (a marker file is written last, so
    an interrupted install starts over); one install at a time (a lock file)."""
    import fcntl

    venv = label_studio_venv()
    command, done = venv / "bin" / "label-studio", venv / ".rlhf-installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return command
        echo(f"installing {LABEL_STUDIO} into {venv} (once; a minute or two)")
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check", LABEL_STUDIO],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=max(_timeout(), 1200))
            if proc.returncode:
                raise StackError(f"installing {LABEL_STUDIO} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
        done.write_text(LABEL_STUDIO + "\n")
    return command


def _start_label_studio(config: StackConfig, procs: dict[str, list[int]]) -> None:
    """Label Studio on the stack's PostgreSQL, on the stack's address only (`--internal-host`: its `--host` is the
    URL it prints, not where it listens); the admin's password and API token from the stack's secrets, through the
    environment (never a command line); no telemetry, no online version check, no sign-up without an invite link."""
    command = install_label_studio()
    env = _server_env(
        config,
        {
            "DJANGO_DB": "default",
            "POSTGRE_NAME": "labelstudio",
            "POSTGRE_USER": config.db_user,
            "POSTGRE_PASSWORD": _password(config),
            "POSTGRE_HOST": config.connect_host,
            "POSTGRE_PORT": str(config.pg_port),
            "LABEL_STUDIO_BASE_DATA_DIR": str(config.home / "label-studio"),
            "LABEL_STUDIO_HOST": config.label_studio_url,
            "LABEL_STUDIO_USERNAME": LABEL_STUDIO_ADMIN,
            "LABEL_STUDIO_PASSWORD": secret(config, "label_studio_password", lambda: secrets.token_urlsafe(18)),
            "LABEL_STUDIO_USER_TOKEN": label_studio_token(config),
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
        },
    )
    env["PATH"] = f"{command.parent}{os.pathsep}{env['PATH']}"
    port = str(config.label_studio_port)
    _spawn(config, procs, "label-studio", [str(command), "start", "--no-browser", "--internal-host", config.host,
                                           "--port", port], env)  # fmt: skip


def _timeout() -> float:
    return float(os.environ.get("RLHF_STACK_TIMEOUT", DEFAULT_TIMEOUT))


STARTERS: dict[str, Callable[[StackConfig, dict[str, list[int]]], None]] = {
    "postgres": _start_postgres,
    "prefect": _start_prefect,
    "mlflow": _start_mlflow,
    "worker": _start_worker,
    "dvc-remote": _start_sshd,
    "label-studio": _start_label_studio,
}


# ---------------------------------------------------------------------------------------------------------------------
# up, down, status, restart
# ---------------------------------------------------------------------------------------------------------------------


def _postmaster(config: StackConfig) -> list[int] | None:
    """PostgreSQL's postmaster (pg_ctl daemonizes it; its pid is in postmaster.pid), if it runs."""
    try:
        pid = int((config.home / "postgres/data/postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    start = _start_time(pid)
    return [pid, start] if start is not None else None


def running(config: StackConfig, name: str, procs: dict[str, list[int]] | None = None) -> bool:
    """`name` is ours (a process this stack started, alive) and answers its health check."""
    procs = _read_state(config.home).get("procs", {}) if procs is None else procs
    ours = _postmaster(config) if name == "postgres" else procs.get(name)
    return _alive(ours) and HEALTH[name](config)


def _prepare(config: StackConfig) -> dict[str, list[int]]:
    """The folder, the service user and the password; refuses to change the configuration of a running stack."""
    state = _read_state(config.home)
    procs: dict[str, list[int]] = state.get("procs", {})
    saved = state.get("config")
    if saved and saved != asdict(config) and (any(_alive(p) for p in procs.values()) or _postmaster(config)):
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in asdict(config).items() if saved.get(k) != v)
        raise StackError(f"the stack in {config.home} runs with other settings ({changed}): `rlhf stack down` first")
    config.home.mkdir(parents=True, exist_ok=True)
    config.home.chmod(0o755)  # the service user must traverse it to reach its own folders
    (config.home / "logs").mkdir(exist_ok=True)
    _ensure_user(config)
    _password(config)
    _write_state(config, procs)
    return procs


def up(
    config: StackConfig, project: Path, deploy: bool = True, echo: Callable[[str], None] = print
) -> dict[str, float]:
    """Start every service that is not running; returns the seconds each took to become healthy (0: it was up)."""
    install_missing(echo)
    procs = _prepare(config)
    seconds: dict[str, float] = {}

    def start(names: list[str]) -> None:  # the services in `names` start together, then each is awaited
        todo = [n for n in names if not running(config, n, procs)]
        t0 = time.monotonic()
        for name in todo:
            echo(f"starting {name}")
            STARTERS[name](config, procs)
        for name in todo:
            _wait(config, name, procs, _timeout())
            seconds[name] = round(time.monotonic() - t0, 1)
            echo(f"{name} is up ({seconds[name]:.1f} s)")
        seconds.update({n: 0.0 for n in names if n not in todo})

    start(["postgres"])
    if config.label_studio_port:
        install_label_studio(echo)  # before the servers start: a first install is a minute of pip
    # each spends most of its start-up importing and migrating: overlap
    start(["prefect", "mlflow", "dvc-remote", *(("label-studio",) if config.label_studio_port else ())])
    start(["worker"])
    if deploy:
        register_deployment(config, project, echo)
    return seconds


def register_deployment(config: StackConfig, project: Path, echo: Callable[[str], None] = print) -> bool:
    """`prefect deploy --name <pool>` from the project: prefect.yaml's deployment for the worker's pool."""
    if not (project / "prefect.yaml").exists():
        echo(f"no prefect.yaml in {project}: deployment {config.pool} not registered")
        return False
    env = {**_server_env(config, {}), "PREFECT_API_URL": config.prefect_api_url, "PWD": str(project)}
    prefect = str(Path(sys.executable).parent / "prefect")
    done = subprocess.run(
        [prefect, "deploy", "--name", config.pool, "--no-prompt"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=_timeout(),
    )
    # prefect 3.8.8 with fastapi 0.154: after registering, `prefect deploy` asks for the pool's online workers with
    # `"limit": null`, which the server rejects (422): the deployment is registered all the same
    known = "/workers/filter" in done.stderr and "422" in done.stderr and "successfully created" in done.stdout
    if done.returncode and not known:
        raise StackError(f"prefect deploy --name {config.pool} failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    echo(
        f"deployment rlhf-pipeline/{config.pool} registered from {project} (run it: prefect deployment run "
        f"'rlhf-pipeline/{config.pool}')"
    )
    return True


def _stop(config: StackConfig, name: str, procs: dict[str, list[int]]) -> bool:
    """Stop one service; True if something was running."""
    if name == "postgres":
        if _postmaster(config) is None:
            return False
        subprocess.run(
            [
                _tool("pg_ctl", "/usr/lib/postgresql/*/bin"),
                "stop",
                "-D",
                str(config.home / "postgres/data"),
                "-m",
                "fast",
                "-w",
                "-t",
                "120",
            ],
            capture_output=True,
            cwd=config.home / "postgres",
            **_as_user(config),
        )
        if (left := _postmaster(config)) is not None:  # pg_ctl gave up: do not leave it behind
            _stop_process(left)
        return True
    proc = procs.pop(name, None)
    was = _alive(proc)
    if proc is not None:
        _stop_process(proc)
    _write_state(config, procs)
    return was


def down(config: StackConfig, echo: Callable[[str], None] = print) -> list[str]:
    """Stop every service this stack started (the worker first, PostgreSQL last); returns the ones that ran."""
    procs = dict(_read_state(config.home).get("procs", {}))
    stopped = []
    for name in ("worker", "label-studio", "prefect", "mlflow", "dvc-remote", "postgres"):
        if _stop(config, name, procs):
            stopped.append(name)
            echo(f"stopped {name}")
    if _read_state(config.home):
        _write_state(config, {})
    return stopped


def restart(config: StackConfig, name: str, down_for: float = 0.0, echo: Callable[[str], None] = print) -> float:
    """Stop one service, keep it down `down_for` seconds, start it again (a crash and a supervisor's restart);
    returns the seconds it was away."""
    procs = dict(_read_state(config.home).get("procs", {}))
    t0 = time.monotonic()
    _stop(config, name, procs)
    echo(f"stopped {name}; starting it again" + (f" in {down_for:.0f} s" if down_for else ""))
    time.sleep(down_for)
    STARTERS[name](config, procs)
    if name != "postgres":  # _start_postgres waits itself
        _wait(config, name, procs, _timeout())
    echo(f"{name} is up again ({time.monotonic() - t0:.1f} s)")
    return time.monotonic() - t0


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    up: bool
    address: str
    detail: str = ""


def status(config: StackConfig) -> list[ServiceStatus]:
    procs = _read_state(config.home).get("procs", {})
    where = {
        "postgres": f"postgresql://{config.db_user}@{config.connect_host}:{config.pg_port}",
        "prefect": f"{config.prefect_url} (API {config.prefect_api_url})",
        "mlflow": config.mlflow_url,
        "worker": f"pool {config.pool} on {config.prefect_api_url}",
        "dvc-remote": config.remote_url,
        "label-studio": config.label_studio_url,
    }
    detail = {
        "postgres": f"databases {', '.join(config.databases)}; data {config.home / 'postgres/data'}",
        "label-studio": f"admin {LABEL_STUDIO_ADMIN}; API token {config.home / 'secrets/label_studio_token'}",
        "mlflow": f"backend PostgreSQL; artifacts proxied into {config.home / 'mlartifacts'}",
        "dvc-remote": f"key {config.home / 'secrets/dvc_ssh_key'}",
    }
    return [ServiceStatus(n, running(config, n, procs), where[n], detail.get(n, "")) for n in config.services]


def format_status(config: StackConfig, services: list[ServiceStatus]) -> str:
    lines = [f"rlhf stack in {config.home}"]
    lines += [
        f"  {s.name:<11} {'up' if s.up else 'DOWN':<5} {s.address}" + (f"\n{'':19}{s.detail}" if s.detail else "")
        for s in services
    ]
    if services[SERVICES.index("mlflow")].up:
        lines.append(f"MLflow UI, its training runs: {training_view(config.mlflow_url)}")
    if missing := missing_packages():
        lines.append(f"missing: Debian's {', '.join(missing)} (`rlhf stack up` installs them as root; else "
                     f"{install_command(missing)})")  # fmt: skip
    lines += [
        'use it:  rlhf run --prefect --stack     (or: eval "$(rlhf stack env)"; rlhf run --prefect)',
        "remote:  rlhf stack remote             (the project's DVC remote; then dvc push / dvc pull)",
    ]
    return "\n".join(lines)


def configure_remote(config: StackConfig, project: Path, name: str = "stack") -> list[list[str]]:
    """Make the stack's SSH store the project's default DVC remote: the URL in .dvc/config (commit it: teammates share
    it), this user's key in .dvc/config.local (each person's own). Returns the dvc commands it ran."""
    dvc = [sys.executable, "-m", "dvc"]
    commands = [
        [*dvc, "remote", "add", "--force", "--default", name, config.remote_url],
        [*dvc, "remote", "modify", "--local", name, "keyfile", urls(config)["dvc_keyfile"]],
    ]
    for cmd in commands:
        done = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=quiet(dict(os.environ)))
        if done.returncode:
            raise StackError(f"{' '.join(cmd[2:])} failed: {done.stderr.strip()}")
    return commands

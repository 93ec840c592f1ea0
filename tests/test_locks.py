"""The promotion lock (stages/lib/locks.py): which lock each tracking store gets, and that two processes really
exclude each other (the Prefect-backed lock that clones on one stack share: tests/test_stack.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from stages.lib import locks
from tests.helpers import ROOT


def holders(uri: str, env: dict[str, str] | None = None, hold: float = 2.0) -> list[dict]:
    """Two processes asking for the lock at about the same time, each holding it `hold` seconds; their reports."""
    cmd = [sys.executable, str(ROOT / "tests/lock_holder.py"), uri, str(hold)]
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT))
        time.sleep(0.2)
    out = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    return sorted(out, key=lambda r: r["got"])


def test_each_tracking_store_gets_its_lock(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert locks.where(f"sqlite:///{tmp_path}/mlflow.db") == f"file:{tmp_path}/mlflow.db.promote.lock"
    assert locks.where("http://127.0.0.1:5000") == "file:.rlhf-registry.promote.lock"  # this clone only
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert locks.where("http://127.0.0.1:5000") == "prefect:rlhf-promote"  # shared by the stack
    assert locks.where(f"sqlite:///{tmp_path}/mlflow.db").startswith("file:")  # a file store: its own file


def test_two_processes_on_one_sqlite_store_take_turns(tmp_path):
    first, second = holders(f"sqlite:///{tmp_path}/mlflow.db")
    assert second["got"] >= first["released"] - 0.05  # no overlap
    assert second["waited_s"] >= 1.0 and first["waited_s"] < 1.0

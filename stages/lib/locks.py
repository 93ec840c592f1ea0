"""The promotion's lock: one read-check-move of the registry's aliases at a time, across everyone who shares the
registry.

    tracking store                      the lock
    sqlite:///path/mlflow.db            a file lock beside the database: every process using that file shares it
    a server, with PREFECT_API_URL set  a global concurrency limit on that Prefect server (`rlhf-promote`, one slot):
                                        every clone and machine on the stack shares it; the slot is a lease that the
                                        server takes back if its holder dies (no stale lock after a kill -9)
    a server, no Prefect server         a file in the working directory: this clone only (said in one line); another
                                        clone promoting at the same moment is caught by promote's re-check alone

`rlhf run --prefect --stack` and the stack's worker set PREFECT_API_URL, so two people on one stack exclude each other.
A drill: RLHF_PROMOTE_HOLD_S=N holds the lock N seconds longer (tests/test_stack.py makes two promotions overlap).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

LIMIT = "rlhf-promote"  # the Prefect global concurrency limit's name, created with one slot on first use


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_limit(name: str = LIMIT) -> None:
    """The global concurrency limit `name` with one slot on the Prefect server of PREFECT_API_URL (created once; a
    concurrent creator's conflict is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def where(tracking_uri: str) -> str:
    """Which lock `promotion_lock` takes for this tracking store: "file:<path>" or "prefect:<limit>"."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"file:{db.with_name(db.name + '.promote.lock')}"
    if os.environ.get("PREFECT_API_URL"):
        return f"prefect:{LIMIT}"
    return "file:.rlhf-registry.promote.lock"


@contextmanager
def promotion_lock(tracking_uri: str, echo: Callable[[str], None] = print) -> Iterator[dict[str, float | str]]:
    """Hold the promotion's lock (see the module's table); yields {"lock": where, "waited_s": seconds it waited}."""
    lock = where(tracking_uri)
    held: dict[str, float | str] = {"lock": lock}
    start = time.monotonic()
    if lock.startswith("prefect:"):
        from prefect.concurrency.sync import concurrency

        ensure_limit()
        with concurrency(LIMIT, occupy=1, strict=True, lease_duration=300):
            held["waited_s"] = round(time.monotonic() - start, 2)
            _drill_hold()
            yield held
        return
    if not tracking_uri.startswith("sqlite:///"):
        echo(
            "promotion lock: a file in this working directory (no PREFECT_API_URL): another clone promoting to "
            f"{tracking_uri} at the same moment is caught by the re-check alone"
        )
    with file_lock(Path(lock.removeprefix("file:"))):
        held["waited_s"] = round(time.monotonic() - start, 2)
        _drill_hold()
        yield held


def _drill_hold() -> None:
    time.sleep(float(os.environ.get("RLHF_PROMOTE_HOLD_S") or 0))

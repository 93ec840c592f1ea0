"""The process environment every command of this project runs with: no telemetry from any library (there is no
network to send it to, and a pipeline should not phone home). The Makefile exports the same variables for `make`."""

from __future__ import annotations

import os

QUIET = {
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def quiet(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment, changed in place) with every telemetry switch off unless set."""
    target = os.environ if env is None else env
    for key, value in QUIET.items():
        target.setdefault(key, value)
    return dict(target)

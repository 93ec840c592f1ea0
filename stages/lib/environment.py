"""The process environment every command of this project runs with: no telemetry from any library (there is no
network to send it to, and a pipeline should not phone home). The Makefile exports the same variables for `make`.
And the one description of the machine a measured figure was taken on (`cpu_model`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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


def cpu_model() -> str:
    """The CPU a figure was measured on: its model name, whether it has AVX-512 / native bf16 / AMX (machines of
    one name differ: an "AMD EPYC" may or may not have AVX-512) and the cores this process may use."""
    cores = len(os.sched_getaffinity(0))
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {cores} cores"
    name = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1] for ln in info if ln.startswith("flags")), "").split())
    known = (("AVX-512", "avx512f"), ("avx512_bf16", "avx512_bf16"), ("AMX", "amx_tile"))
    features = [label for label, flag in known if flag in flags] or ["no AVX-512"]
    return f"{name} ({', '.join(features)}), {cores} cores"

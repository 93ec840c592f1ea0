"""glibc's malloc, tuned for training steps on the CPU: every stage process runs with it (`python -m stages.<name>`).

A training step on the CPU frees and reallocates the same large tensors (activations, logits, gradients) every step.
glibc's defaults give those pages back to the kernel on `free` (top-of-heap trimming, and `mmap`'d chunks), so the
next step faults every page in again, zero-filled by the kernel: on this project's 2-core VMs ~170k minor page faults
a step at SmolLM2-135M's shape, and a fp32 training step ~1.5x slower than with these tunables, which bring the faults
to almost none (benchmarks/allocator.py, benchmarks/allocator_results.json; the PPO stage's batch in
benchmarks/ppo_135m_results_intel*.json). The cost: a process keeps the memory of its peak step instead of returning it
between steps (its peak RSS does not grow).

GLIBC_TUNABLES is read once, when a process starts, so a stage started without it starts again at once with it
(before torch is imported; ~20 ms). A GLIBC_TUNABLES already in the environment is the user's and is left as it is.
"""

from __future__ import annotations

import os
import sys

TUNABLES = ":".join(
    (
        "glibc.malloc.mmap_threshold=33554432",  # chunks up to 32 MiB (glibc's ceiling) from the heap, not mmap
        "glibc.malloc.trim_threshold=17179869184",  # never trim the heap's top back to the kernel between steps
        "glibc.malloc.top_pad=1073741824",  # grow the heap 1 GiB at a time (address space; pages fault on use)
    )
)


def tuned_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the tunables, unless it names GLIBC_TUNABLES itself."""
    env = dict(os.environ if env is None else env)
    env.setdefault("GLIBC_TUNABLES", TUNABLES)
    return env


def restart_tuned() -> None:
    """Start this `python -m stages.<name>` again with the tunables, if it started without them (Linux only)."""
    starting_a_module = sys.argv[:1] == ["-m"]  # what sys.argv[0] is while `python -m` imports the package
    if sys.platform == "linux" and starting_a_module and "GLIBC_TUNABLES" not in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, tuned_environment())

"""Checkpoints for exact resume and rollback: every random state, written atomically, loaded safely.

A checkpoint is a dict of tensors and plain data (numbers, strings, lists, dicts): `torch.load(weights_only=True)`
reads it without unpickling arbitrary objects, so a checkpoint folder someone else wrote cannot run code here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def fingerprint(settings: dict[str, Any], inputs: list[Path]) -> str:
    """Identity of a run: a checkpoint resumes only the run that wrote it (the same results-relevant settings, and
    the same bytes in every input file or folder, code included)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in inputs:
        for f in sorted(path.rglob("*") if path.is_dir() else [path]):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    n = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


class Checkpointer:
    """Checkpoints of one run (and only that run) under `<checkpoint_dir>/<fingerprint>/step_NNNNNN/state.pt`:
    written atomically, the newest `keep` kept, loaded with `weights_only=True` (tensors and plain data only)."""

    def __init__(self, root: Path, run_id: str, keep: int) -> None:
        self.dir, self.keep = root / run_id, keep

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:06d}" / "state.pt"

    def latest(self) -> tuple[int, Path] | None:
        found = sorted(self.dir.glob("step_*/state.pt"))
        return (int(found[-1].parent.name.removeprefix("step_")), found[-1]) if found else None

    def save(self, step: int, state: dict[str, Any], protect: int | None = None) -> Path:
        """Atomic: a kill mid-write leaves the previous checkpoint as the latest. Older checkpoints beyond the newest
        `keep` are pruned, except step `protect` (the best one so far, which the run may keep as its output)."""
        path = self.path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".state.pt.{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in sorted(self.dir.glob("step_*"))[: -self.keep]:
            if protect is None or old != self.path(protect).parent:
                shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, weights_only=True)

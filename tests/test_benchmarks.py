"""The PPO benchmark harness (benchmarks/ppo_vs_trl.py, benchmarks/run.sh) runs end to end at a tiny shape, so a
change to the PPO stage or the tracking interface cannot break the benchmark unnoticed (it once died on a tracker
method the stage had gained). TRL's side needs its own venv (run.sh builds it) and is measured by the benchmark."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import ROOT, run

pytestmark = pytest.mark.slow


def test_the_ppo_benchmark_runs_our_side_at_a_tiny_shape(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/ppo_vs_trl.py"), "--shapes", "T", "--batches", "2"]
    run([*cmd, "--repeats", "1", "--out", str(out)], tmp_path, timeout=600)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert "error" not in row, row
    assert row["impl"] == "ours" and row["shape"] == "T"
    assert row["s_per_batch"] > 0 and row["tokens_per_s"] > 0
    assert row["generation_s"] > 0 and row["update_s"] > 0


def test_the_tracker_stand_in_has_the_whole_tracking_interface():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ppo_vs_trl
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from stages.lib.tracking import Tracker

    tracker = ppo_vs_trl.timing_tracker()
    assert isinstance(tracker, Tracker)  # a runtime-checkable Protocol: every method present
    tracker.log_table([{"a": 1}], "samples.json")
    tracker.log_metrics({"time/step": 1.0}, step=1)
    assert len(tracker.steps) == 1

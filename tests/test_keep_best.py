"""keep: best selects on signal, not on the monitor's noise (stages/ppo.py best_checkpoint, stages/lib/heldout.py)."""

from __future__ import annotations

import random

from stages.lib.heldout import better_beyond_noise
from stages.ppo import best_checkpoint


def _monitor(per_step: dict[int, list[float]]) -> list[dict]:
    return [{"step": s, "judge": sum(v) / len(v), "judge_by_prompt": v} for s, v in per_step.items()]


def _same_policy(seed: int, n_prompts: int = 40, samples: int = 4) -> list[float]:
    """Per-prompt means of `samples` draws of one fixed policy's scores: checkpoints that differ only by sampling."""
    rng = random.Random(seed)
    prompt_quality = [random.Random(p).gauss(0, 1) for p in range(n_prompts)]
    return [sum(q + rng.gauss(0, 1.5) for _ in range(samples)) / samples for q in prompt_quality]


def test_checkpoints_that_differ_only_by_sampling_keep_the_last_step():
    kept_other = 0
    for trial in range(50):
        monitor = _monitor({step: _same_policy(trial * 10 + step) for step in (0, 5, 10, 15, 20)})
        step, why = best_checkpoint(monitor, 20, "the last step", 2.0)
        kept_other += step != 20
        assert step == 20 or "leads the last step" in why
    assert kept_other <= 3  # z = 2 over the best of 4 rivals: a false pick now and then, not as a rule


def test_a_checkpoint_better_beyond_noise_is_kept():
    base = _same_policy(1)
    monitor = _monitor({0: base, 5: [x + 1.0 for x in _same_policy(2)], 10: _same_policy(3)})
    step, why = best_checkpoint(monitor, 10, "the last step", 2.0)
    assert step == 5 and "leads the last step by +" in why


def test_the_last_step_when_it_is_best_and_without_a_monitor_point():
    monitor = _monitor({0: [0.0, 0.0], 5: [1.0, 2.0]})
    assert best_checkpoint(monitor, 5, "the last step", 2.0)[0] == 5
    assert best_checkpoint(monitor, 7, "the last step", 2.0) == [7, "the last step (no monitor point to compare)"]


def test_better_beyond_noise_is_the_paired_z_rule():
    assert better_beyond_noise([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], 2.0) == (True, 1.0, 0.0)
    beats, mean, se = better_beyond_noise([1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0], 2.0)
    assert not beats and mean == 0.0 and se > 0

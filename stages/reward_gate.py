"""Reward-model gate: decide from the reward stage's held-out numbers whether PPO may climb this reward model.

If the reward model agrees with held-out labels less than it should, PPO would climb a bad proxy, so the pipeline stops
here. "Should" is an absolute floor (`min_agreement`) and, where one is known, a ceiling it must come near:

- the simulated labeler's own agreement with the gold judge (data/labeler.json), on exactly the pairs it was measured
  on (their digest must match the validated held-out pairs): a perfect reward model cannot agree with noisy labels
  more often than the labels agree with the truth;
- else, on a user's own data with a judge reward model, that model's held-out accuracy: an estimate from the data of
  what a reward model of this size learns from half as many pairs;
- else the floor alone. The verdict names which ceiling it used.

On the default task it also needs a floor on the rank agreement with the gold judge.

A reward model can agree with the offline labels and still be unable to rank what PPO will produce. So where the
comparisons stage labelled pairs of the policy's own replies, the gate also asks for enough accuracy on those
held-out pairs, near the labeler's own agreement with the gold judge on the same pairs (their ceiling, default task),
and for a positive gold gain of the reward model's best-of-n pick among each held-out prompt's replies. The two
accuracy checks allow for the held-out comparisons' sampling noise (`on_policy_z` standard errors): with labels this
noisy, reward models of one recipe differ by seed by more than a bare threshold can tell apart.

The gate is its own DVC stage so that moving a threshold re-judges the saved numbers in a second instead of retraining
the reward model. It writes `metrics.json` (the verdict, its reason and numbers) always, and `passed.json` only when the
gate passed: PPO depends on that file, whose content does not change with the thresholds, so loosening or tightening a
gate that still passes reruns nothing downstream.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from stages.lib.io import read_jsonl, write_json
from stages.lib.outcome import ArgumentParser, GateFailed, stage_main
from stages.lib.params import FINITE, FRACTION, Allowed, config_from, load_params
from stages.lib.schema import pairs_digest
from stages.lib.tracking import mlflow_run


@dataclass(frozen=True)
class GateConfig:
    """params.yaml: reward_gate."""

    min_agreement: float  # held-out pairwise accuracy against the labels
    max_gap_to_ceiling: float  # ... and at most this far below the labeler's own agreement with gold
    min_rank_agreement: float  # Spearman of RM score vs gold score on held-out replies (default task only)
    min_on_policy_agreement: float  # accuracy on held-out comparisons of the policy's own replies ...
    max_on_policy_gap: float  # ... at most this far below the labeler's agreement with gold on them
    min_bon_gold_gain: float  # gold of the RM's best-of-n pick minus the replies' mean (default task only)
    on_policy_z: float  # an on-policy shortfall must exceed this many standard errors of the accuracy to fail

    SECTION: ClassVar[str] = "reward_gate"
    RANGES: ClassVar[dict] = {
        "min_agreement": FRACTION,
        "max_gap_to_ceiling": FRACTION,
        "min_rank_agreement": Allowed(-1, 1),
        "min_on_policy_agreement": FRACTION,
        "max_on_policy_gap": FRACTION,
        "min_bon_gold_gain": FINITE,
        "on_policy_z": Allowed(0, 10),
    }


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict: the flow, the logs, metrics.json and the MLflow tags all carry `reason`."""

    passed: bool
    reason: str
    numbers: dict[str, float | None]


def agreement_gate(
    accuracy: float, ceiling: float | None, rank_agreement: float | None, gate: GateConfig
) -> GateResult:
    """Pass when the RM agrees with held-out labels well enough: above the floor and near the labeler's ceiling."""
    numbers = {
        "accuracy": accuracy,
        "ceiling": ceiling,
        "rank_agreement_gold": rank_agreement,
        "min_agreement": gate.min_agreement,
        "max_gap_to_ceiling": gate.max_gap_to_ceiling,
        "min_rank_agreement": gate.min_rank_agreement,
    }
    failures = []
    if accuracy < gate.min_agreement:
        failures.append(f"held-out accuracy {accuracy:.3f} < min_agreement {gate.min_agreement:.3f}")
    if ceiling is not None and accuracy < ceiling - gate.max_gap_to_ceiling:
        failures.append(
            f"held-out accuracy {accuracy:.3f} is more than {gate.max_gap_to_ceiling:.2f} below the "
            f"ceiling {ceiling:.3f}"
        )
    if rank_agreement is not None and rank_agreement < gate.min_rank_agreement:
        failures.append(f"rank agreement with the gold judge {rank_agreement:.3f} < {gate.min_rank_agreement:.3f}")
    if failures:
        return GateResult(False, "reward-model gate failed: " + "; ".join(failures), numbers)
    ceiling_txt = f" (ceiling {ceiling:.3f})" if ceiling is not None else ""
    return GateResult(True, f"reward-model gate passed: held-out accuracy {accuracy:.3f}{ceiling_txt}", numbers)


def accuracy_se(accuracy: float, n: int | None) -> float:
    """Standard error of an accuracy measured on n pairs, sqrt(p (1 - p) / n); 0 when n is unknown (strict)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0


def short(accuracy: float, threshold: float, se: float, z: float) -> bool:
    """Below `threshold` by more than z standard errors: a shortfall the held-out pairs' noise cannot explain (the
    measured spread by seed that calls for it: docs/comparisons.md)."""
    return accuracy + z * se < threshold


def on_policy_gate(reward: dict[str, Any], ceiling: float | None, gate: GateConfig) -> GateResult:
    """Pass when the RM ranks the policy's own replies: accurate on held-out comparisons of them, near the labels'
    agreement with gold there (both beyond the measurement's noise: `on_policy_z` standard errors), and its
    best-of-n pick better than their mean by the gold judge. Passes with nothing to check (no comparisons)."""
    accuracy, gain = reward.get("on_policy_accuracy"), reward.get("bon_gold_gain")
    se = accuracy_se(accuracy, reward.get("on_policy_n_test")) if accuracy is not None else None
    numbers = {
        "on_policy_accuracy": accuracy,
        "on_policy_accuracy_se": se,
        "on_policy_ceiling": ceiling,
        "on_policy_gold_pair_accuracy": reward.get("on_policy_gold_pair_accuracy"),
        "bon_n": reward.get("bon_n"),
        "bon_gold_gain": gain,
        "bon_gold_headroom": reward.get("bon_gold_headroom"),
        "min_on_policy_agreement": gate.min_on_policy_agreement,
        "max_on_policy_gap": gate.max_on_policy_gap,
        "min_bon_gold_gain": gate.min_bon_gold_gain,
        "on_policy_z": gate.on_policy_z,
    }
    failures = []
    noise = f" beyond {gate.on_policy_z:g} standard errors ({se:.3f})" if se else ""
    if accuracy is not None and short(accuracy, gate.min_on_policy_agreement, se, gate.on_policy_z):
        failures.append(
            f"accuracy on the policy's own replies {accuracy:.3f} < min_on_policy_agreement "
            f"{gate.min_on_policy_agreement:.3f}{noise}"
        )
    if (
        accuracy is not None
        and ceiling is not None
        and short(accuracy, ceiling - gate.max_on_policy_gap, se, gate.on_policy_z)
    ):
        failures.append(
            f"accuracy on the policy's own replies {accuracy:.3f} is more than {gate.max_on_policy_gap:.2f} below "
            f"the labels' ceiling there ({ceiling:.3f}: their agreement with the gold judge, or the annotators' with "
            f"each other){noise}"
        )
    if gain is not None and gain < gate.min_bon_gold_gain:
        failures.append(
            f"its best-of-{reward.get('bon_n')} pick gains {gain:+.3f} gold over the replies' mean "
            f"< min_bon_gold_gain {gate.min_bon_gold_gain:+.3f}"
        )
    if failures:
        return GateResult(False, "; ".join(failures), numbers)
    said = f"on the policy's own replies {accuracy:.3f}" if accuracy is not None else "no on-policy comparisons"
    said += f" (ceiling {ceiling:.3f})" if accuracy is not None and ceiling is not None else ""
    said += f", best-of-{reward.get('bon_n')} gold gain {gain:+.3f}" if gain is not None else ""
    return GateResult(True, said, numbers)


def ceiling(labeler_file: Path, heldout_pairs: Path, judge_metrics: Path | None) -> tuple[float | None, str]:
    """The agreement the reward model should come near, and where it comes from (see the module's docstring)."""
    if labeler_file.exists():
        labeler = json.loads(labeler_file.read_text())
        if labeler.get("heldout_pairs_digest") == pairs_digest(read_jsonl(heldout_pairs)):
            return labeler["labeler_ceiling_test"], "the simulated labeler's agreement with the gold judge"
    if judge_metrics is not None and judge_metrics.exists():
        judged = json.loads(judge_metrics.read_text())
        if judged.get("kind") == "reward_model":
            return judged["accuracy"], "the judge reward model's held-out accuracy (estimated from the data)"
    return None, "none known for these pairs: the floor alone"


def labels_ceiling(comparisons: dict[str, Any]) -> float | None:
    """The on-policy ceiling: the labels' agreement with the gold judge on the test pairs where one exists (the
    simulated labeler), else the annotators' agreement with each other there (people in Label Studio)."""
    gold_agreement = comparisons.get("labeler_gold_agreement_test")
    return gold_agreement if gold_agreement is not None else comparisons.get("annotator_agreement_test")


def run(
    gate: GateConfig,
    reward_metrics: dict[str, Any],
    known: tuple[float | None, str],
    on_policy_ceiling: float | None,
    out_dir: Path,
) -> GateResult:
    """Judge the reward model's numbers against the floor and `known` (ceiling, its source), and its numbers on the
    policy's own replies; write metrics.json always and passed.json only when the gate passed."""
    offline = agreement_gate(reward_metrics["accuracy"], known[0], reward_metrics.get("rank_agreement_gold"), gate)
    own = on_policy_gate(reward_metrics, on_policy_ceiling, gate)
    passed = offline.passed and own.passed
    if passed:
        reason = f"{offline.reason}; {own.reason}; ceiling: {known[1]}"
    else:
        reason = "reward-model gate failed: " + "; ".join(
            r.reason.removeprefix("reward-model gate failed: ") for r in (offline, own) if not r.passed
        )
        reason += f"; ceiling: {known[1]}"
    result = GateResult(passed, reason, {**offline.numbers, **own.numbers})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "metrics.json",
        {"passed": result.passed, "reason": result.reason, "ceiling_source": known[1], **result.numbers},
    )
    if result.passed:
        write_json(out_dir / "passed.json", {"passed": True})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.reward_gate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reward", default="artifacts/reward/metrics.json", help="the reward stage's metrics")
    parser.add_argument("--labeler", default="data/labeler.json", help="the simulated labeler's statistics, if any")
    parser.add_argument(
        "--heldout",
        default="artifacts/validate/data/preferences_test.jsonl",
        help="the validated held-out pairs the accuracy was measured on",
    )
    parser.add_argument("--judge-metrics", default="artifacts/judge/metrics.json", help="the judge stage's numbers")
    parser.add_argument(
        "--comparisons-metrics",
        default="artifacts/comparisons/metrics.json",
        help="the comparisons stage's numbers (the labels' agreement with gold on the held-out comparisons)",
    )
    parser.add_argument("--out", default="artifacts/reward_gate")
    args = parser.parse_args(argv)
    gate = config_from(GateConfig, load_params(args.params).get("reward_gate"))
    reward_metrics = json.loads(Path(args.reward).read_text())
    with mlflow_run("reward_gate") as tracker:
        tracker.log_params({"reward_gate": asdict(gate)})
        known = ceiling(Path(args.labeler), Path(args.heldout), Path(args.judge_metrics))
        compared = Path(args.comparisons_metrics)
        on_policy_ceiling = labels_ceiling(json.loads(compared.read_text())) if compared.exists() else None
        result = run(gate, reward_metrics, known, on_policy_ceiling, Path(args.out))
        tracker.log_metrics({k: v for k, v in result.numbers.items() if v is not None})
        tracker.set_tags(
            {
                "rlhf.gate": "passed" if result.passed else "failed",
                "rlhf.gate_reason": result.reason,
                "rlhf.gate_ceiling": known[1],
            }
        )
    if not result.passed:
        raise GateFailed(result.reason)
    print(result.reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("reward_gate", main))

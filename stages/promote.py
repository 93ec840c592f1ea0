"""Promotion stage: register the PPO policy in the MLflow Model Registry; move `champion` only when numbers say so.

Criteria (params.yaml: promote): win-rate over SFT, win-rate over the current champion (same prompts, same sampling),
KL to the reference, alignment tax, and no over-optimisation flag. Pass: alias `champion` moves to the new version
and `previous-champion` to the one it replaces. Fail: the version gets alias `challenger` and its reasons as a tag;
the champion does not move. Alias moves happen under a lock and re-check the champion they compared against, so two
pipelines finishing at once leave exactly one consistent champion; promoting the same weights twice changes nothing.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import mlflow

from stages.lib.heldout import Sampling, judge_scores, win_rate
from stages.lib.io import read_jsonl, write_json
from stages.lib.judge import GoldJudge, Judge, load_judge
from stages.lib.locks import promotion_lock
from stages.lib.modeling import autocast, load_causal_lm, use_hardware
from stages.lib.outcome import ArgumentParser, BadInput, stage_main
from stages.lib.params import FINITE, FRACTION, NON_NEGATIVE, config_from, load_params
from stages.lib.registry import HF_ARTIFACT, MODEL_HASH_TAG, SERVED_POLICY, fetch_policy, model_hash
from stages.lib.tracking import Tracker, mlflow_run

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous-champion", "challenger"


@dataclass(frozen=True)
class PromoteConfig:
    """params.yaml: promote."""

    registered_model: str
    min_win_rate_vs_sft: float  # the judge's win-rate over SFT ...
    min_win_rate_vs_sft_ci_low: float  # ... and the lower end of its 95% interval (clustered by prompt)
    min_win_rate_vs_champion: float
    max_kl: float  # ppo/kl_k1_seq: nats per response
    max_alignment_tax: float  # perplexity rise on the held-out demonstrations the judge rates best
    block_on_overoptimisation: bool

    SECTION: ClassVar[str] = "promote"
    RANGES: ClassVar[dict] = {
        "min_win_rate_vs_sft": FRACTION,
        "min_win_rate_vs_sft_ci_low": FRACTION,
        "min_win_rate_vs_champion": FRACTION,
        "max_kl": NON_NEGATIVE,
        "max_alignment_tax": FINITE,
    }

    def __post_init__(self) -> None:
        if not self.registered_model.strip():
            raise ValueError("promote.registered_model must name a registered model, not be empty")


@dataclass(frozen=True)
class Decision:
    passed: bool
    reasons: list[str]


def candidate(metrics: dict[str, Any]) -> dict[str, Any]:
    """The policy to register: PPO's, or DPO's when the evaluation graded a DPO policy that beat PPO's on the
    judge's win-rate over SFT. Returns its trainer and the numbers promotion judges it by."""
    ppo = {
        "trainer": "ppo",
        "win_rate_vs_sft": metrics["win_rate_vs_sft"],
        "win_rate_vs_sft_ci_low": (metrics.get("win_rate_vs_sft_ci") or [metrics["win_rate_vs_sft"]])[0],
        "kl": metrics["ppo/kl_k1_seq"],
        "alignment_tax": metrics["alignment_tax"],
        "overoptimisation": metrics["overoptimisation"],
        "overoptimisation_reason": metrics["overoptimisation_reason"],
    }
    if metrics.get("dpo_win_rate_vs_sft", -1.0) <= ppo["win_rate_vs_sft"]:
        return ppo
    return {
        "trainer": "dpo",
        "win_rate_vs_sft": metrics["dpo_win_rate_vs_sft"],
        "win_rate_vs_sft_ci_low": (metrics.get("dpo_win_rate_vs_sft_ci") or [metrics["dpo_win_rate_vs_sft"]])[0],
        "kl": metrics["dpo/kl_k1_seq"],
        "alignment_tax": metrics["dpo/perplexity"] - metrics["sft/perplexity"],
        "overoptimisation": False,
        "overoptimisation_reason": "DPO has no checkpoints to monitor",
    }


def promotion_criteria(chosen: dict[str, Any], vs_champion: float | None, config: PromoteConfig) -> Decision:
    """The promotion gate on the candidate's numbers (see `candidate`): every failed criterion is a reason."""
    reasons = []
    if chosen["win_rate_vs_sft"] < config.min_win_rate_vs_sft:
        reasons.append(f"win-rate vs SFT {chosen['win_rate_vs_sft']:.3f} < {config.min_win_rate_vs_sft}")
    if chosen["win_rate_vs_sft_ci_low"] < config.min_win_rate_vs_sft_ci_low:
        reasons.append(
            f"the win-rate vs SFT's 95% interval reaches down to {chosen['win_rate_vs_sft_ci_low']:.3f} < "
            f"{config.min_win_rate_vs_sft_ci_low} (not better than SFT beyond the evaluation's noise)"
        )
    if vs_champion is not None and vs_champion < config.min_win_rate_vs_champion:
        reasons.append(f"win-rate vs champion {vs_champion:.3f} < {config.min_win_rate_vs_champion}")
    if chosen["kl"] > config.max_kl:
        reasons.append(f"KL to the reference {chosen['kl']:.3f} > max_kl {config.max_kl}")
    if chosen["alignment_tax"] > config.max_alignment_tax:
        reasons.append(f"alignment tax {chosen['alignment_tax']:.4f} > {config.max_alignment_tax}")
    if config.block_on_overoptimisation and chosen["overoptimisation"]:
        reasons.append(chosen["overoptimisation_reason"])
    return Decision(not reasons, reasons)


def current_version(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def find_or_register(client: mlflow.MlflowClient, name: str, hf_dir: Path, digest: str, tags: dict[str, str]):
    """The version holding these exact weights, registering them if new: a pyfunc logged from code in this run
    (stages/lib/served_policy.py, so serving it unpickles no class), its HF folder as the artifact `hf_model`."""
    with suppress(mlflow.exceptions.MlflowException):  # it exists already
        client.create_registered_model(name, description="RLHF policies; alias `champion` is the one to serve.")
    for v in client.search_model_versions(f"name='{name}'"):
        if v.tags.get(MODEL_HASH_TAG) == digest:
            return v
    info = mlflow.pyfunc.log_model(
        name="policy",
        python_model=str(SERVED_POLICY),
        artifacts={HF_ARTIFACT: str(hf_dir)},
        code_paths=[str(Path(__file__).resolve().parent)],  # the stages package: the pyfunc imports stages.lib
        pip_requirements=["torch==2.13.0", "transformers==5.23.0", f"mlflow=={mlflow.__version__}"],
    )
    version = mlflow.register_model(info.model_uri, name, tags={MODEL_HASH_TAG: digest, **tags})
    return client.get_model_version(name, version.version)


def champion_win_rate(champion, samples: list[dict], sampling: Sampling, judge: Judge, trainer: str = "ppo") -> float:
    """Candidate vs champion on the evaluation's prompts: champion replies sampled with the same settings and seed,
    graded by the judge that graded the candidate in the evaluation. The champion's HF folder is read as
    stages/lib/registry.py checks it (registered by this pipeline, safetensors), never unpickled."""
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = load_causal_lm(fetch_policy(f"models:/{champion.name}/{champion.version}", Path(scratch)))
    prompts = [s["prompt"] for s in samples]
    champion_scores = judge_scores(model, tokenizer, judge, prompts, sampling)
    return win_rate([s[f"{trainer}_judge"] for s in samples], champion_scores)


def move_aliases(
    client: mlflow.MlflowClient, name: str, version, decision: Decision, champion_before
) -> dict[str, Any]:
    """Apply the decision; idempotent (the champion already being this version changes nothing)."""
    if not decision.passed:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        client.set_model_version_tag(name, version.version, "rlhf.promotion", "rejected")
        client.set_model_version_tag(name, version.version, "rlhf.promotion_reasons", "; ".join(decision.reasons))
        return {"promoted": False}
    if champion_before is not None and champion_before.version == version.version:
        return {"promoted": True, "unchanged": True}
    if champion_before is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion_before.version)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    challenger = current_version(client, name, CHALLENGER)
    if challenger is not None and challenger.version == version.version:
        client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, version.version, "rlhf.promotion", "champion")
    client.set_model_version_tag(name, version.version, "rlhf.promotion_reasons", "all criteria passed")
    return {"promoted": True, "unchanged": False}


@dataclass(frozen=True)
class Inputs:
    """What promotion reads (dvc.yaml passes each path in the stage's command)."""

    metrics: Path  # the evaluation's metrics.json
    samples: Path  # the evaluation's samples.jsonl: the candidate's replies, re-judged against the champion's
    policy: Path  # the candidate policy (HF folder)
    policy_metrics: Path  # the PPO stage's metrics.json (its MLflow run id, for lineage)
    judge: Path | None = None  # the judge stage's judge, which grades the champion as it graded the candidate
    dpo: Path | None = None  # the DPO stage's folder: its policy is the candidate when it beat PPO's


def run(
    config: PromoteConfig, sampling: Sampling, inputs: Inputs, out_path: Path, tracker: Tracker, force: bool = False
) -> dict[str, Any]:
    """Register the candidate, judge it against SFT and the champion, and move the aliases."""
    client = mlflow.MlflowClient()
    metrics = json.loads(inputs.metrics.read_text())
    samples = read_jsonl(inputs.samples)
    chosen = candidate(metrics)
    policy = inputs.policy if chosen["trainer"] == "ppo" else inputs.dpo / "model"
    ppo_metrics = json.loads(inputs.policy_metrics.read_text()) if inputs.policy_metrics.exists() else {}
    digest = model_hash(policy)
    tags = {
        "rlhf.win_rate_vs_sft": f"{chosen['win_rate_vs_sft']:.4f}",
        "rlhf.kl": f"{chosen['kl']:.4f}",
        "rlhf.trainer": chosen["trainer"],
        "rlhf.ppo_run_id": str(ppo_metrics.get("mlflow_run_id", "")),
        "rlhf.source_run_id": tracker.run_id,
    }
    tracker.log_params({"promote": asdict(config)})
    version = find_or_register(client, config.registered_model, policy, digest, tags)

    waited = 0.0
    while True:  # compare against the champion as it is when the aliases move
        champion = current_version(client, config.registered_model, CHAMPION)
        vs_champion = None
        if champion is not None and champion.version != version.version:
            vs_champion = champion_win_rate(
                champion,
                samples,
                sampling,
                load_judge(inputs.judge) if inputs.judge else GoldJudge(),
                chosen["trainer"],
            )
        decision = Decision(True, []) if force else promotion_criteria(chosen, vs_champion, config)
        with promotion_lock(mlflow.get_tracking_uri()) as lock:
            waited += float(lock["waited_s"])
            now = current_version(client, config.registered_model, CHAMPION)
            if (now and now.version) != (champion and champion.version):
                continue  # another pipeline promoted meanwhile: judge against the new champion
            moved = move_aliases(client, config.registered_model, version, decision, champion)
            break

    result = {
        "version": int(version.version),
        "registered_model": config.registered_model,
        "model_hash": digest,
        "promoted": moved["promoted"],
        "reasons": decision.reasons,
        "forced": force,
        "trainer": chosen["trainer"],
        "win_rate_vs_sft": chosen["win_rate_vs_sft"],
        "win_rate_vs_champion": vs_champion,
        "champion_before": int(champion.version) if champion else None,
        "champion": int(version.version) if moved["promoted"] else (int(champion.version) if champion else None),
        "lock": lock["lock"],  # stages/lib/locks.py: shared by every clone on the stack
        "lock_waited_s": round(waited, 2),  # how long another promotion held it
    }
    write_json(out_path, result)
    tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    tracker.set_tags(
        {
            "rlhf.promoted": str(result["promoted"]),
            "rlhf.version": str(version.version),
            "rlhf.reasons": "; ".join(decision.reasons) or "all criteria passed",
        }
    )
    tracker.log_artifact(out_path)
    return result


def promote_run(run_id: str, force: bool, config: PromoteConfig) -> dict[str, Any]:
    """`rlhf promote --run-id`: promote the version registered from that run (criteria re-checked unless --force)."""
    client = mlflow.MlflowClient()
    versions = [
        v
        for v in client.search_model_versions(f"name='{config.registered_model}'")
        if v.run_id == run_id or v.tags.get("rlhf.source_run_id") == run_id
    ]
    if not versions:
        raise BadInput(f"no version of {config.registered_model!r} was registered from run {run_id}")
    version = versions[0]
    reasons = (
        []
        if force
        else [r for r in version.tags.get("rlhf.promotion_reasons", "").split("; ") if r and r != "all criteria passed"]
    )
    decision = Decision(not reasons, reasons)
    with promotion_lock(mlflow.get_tracking_uri()):
        champion = current_version(client, config.registered_model, CHAMPION)
        moved = move_aliases(client, config.registered_model, version, decision, champion)
    return {"version": int(version.version), **moved, "reasons": reasons}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.promote", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--eval-metrics", default="artifacts/evaluate/metrics.json", help="the evaluation's metrics")
    parser.add_argument("--eval-samples", default="artifacts/evaluate/samples.jsonl", help="the evaluation's samples")
    parser.add_argument("--policy", default="artifacts/ppo/model", help="the candidate policy")
    parser.add_argument("--policy-metrics", default="artifacts/ppo/metrics.json", help="the PPO stage's metrics")
    parser.add_argument("--judge", help="the judge stage's judge (artifacts/judge/model); default: the gold function")
    parser.add_argument("--dpo", help="the DPO stage's folder (artifacts/dpo), a candidate when it beat PPO")
    parser.add_argument("--out", default="artifacts/promote/metrics.json")
    parser.add_argument("--force", action="store_true", help="promote whatever the criteria say")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(PromoteConfig, params.get("promote"))
    sampling = Sampling.of(params.get("evaluate") or {})  # the champion is sampled as the candidate was evaluated
    precision = use_hardware(params).precision
    with mlflow_run("promote") as tracker, autocast(precision):
        inputs = Inputs(
            Path(args.eval_metrics),
            Path(args.eval_samples),
            Path(args.policy),
            Path(args.policy_metrics),
            Path(args.judge) if args.judge else None,
            Path(args.dpo) if args.dpo else None,
        )
        r = run(config, sampling, inputs, Path(args.out), tracker, args.force)
    if r["promoted"]:
        print(
            f"promoted: {config.registered_model} version {r['version']} is the champion "
            f"(models:/{config.registered_model}@champion)"
        )
    else:
        print(
            f"not promoted: version {r['version']} is the challenger; champion stays "
            f"{r['champion']}: {'; '.join(r['reasons'])}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("promote", main))

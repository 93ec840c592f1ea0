"""Evaluation and promotion against a real MLflow SQLite registry, on a tiny project run through `rlhf run`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from stages import evaluate
from stages.lib import gold
from stages.lib.heldout import judged_best, win_rate
from stages.lib.io import read_jsonl
from stages.lib.judge import GoldJudge
from stages.lib.outcome import ExitCode
from tests.helpers import BIN, OPEN_GATE, OPEN_PROMOTE, env, make_project, run

pytestmark = pytest.mark.slow

PASSING = {
    "reward_gate": OPEN_GATE,
    "ppo": {
        "num_steps": 3,
        "batch_size": 16,
        "ppo_epochs": 2,
        "response_length": 16,
        "n_monitor": 8,
        "checkpoint_every": 1,
        "learning_rate": 1e-4,
    },
    "dpo": {"enabled": True, "batch_size": 8, "max_length": 64, "learning_rate": 1e-4},
    "evaluate": {"n_prompts": 12, "samples_per_prompt": 2, "max_new_tokens": 16},
    "promote": OPEN_PROMOTE,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = make_project(tmp_path_factory.mktemp("proj"), PASSING)
    run([str(BIN / "rlhf"), "run"], dest)
    return dest


def _client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _alias(client: mlflow.MlflowClient, alias: str) -> int | None:
    try:
        return int(client.get_model_version_by_alias("rlhf-policy", alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _candidate(project: Path, dest: Path, seed: int) -> Path:
    """A copy of the PPO output with slightly different weights: a distinct candidate for the registry."""
    shutil.copytree(project / "artifacts/ppo", dest)
    weights = load_file(dest / "model/model.safetensors")
    g = torch.Generator().manual_seed(seed)
    name = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[name] = weights[name] + 1e-3 * torch.randn(weights[name].shape, generator=g)
    save_file(weights, dest / "model/model.safetensors", metadata={"format": "pt"})
    return dest


def _promote(project: Path, ppo_dir: Path, out: Path, params: dict | None = None) -> subprocess.Popen:
    params_file = project / "params.yaml"
    if params:
        merged = yaml.safe_load(params_file.read_text())
        merged["promote"] = {**merged["promote"], **params}
        params_file = out.parent / f"{out.stem}-params.yaml"
        params_file.write_text(yaml.safe_dump(merged))
    cmd = [
        sys.executable,
        "-m",
        "stages.promote",
        "--params",
        str(params_file),
        "--policy",
        str(ppo_dir / "model"),
        "--policy-metrics",
        str(ppo_dir / "metrics.json"),
        "--out",
        str(out),
    ]
    return subprocess.Popen(cmd, cwd=project, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_report_and_metrics(project):
    out = project / "artifacts/evaluate"
    m = json.loads((out / "metrics.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    n, k = PASSING["evaluate"]["n_prompts"], PASSING["evaluate"]["samples_per_prompt"]
    assert len(samples) == n * k and m["prompts"] == n and m["judge"] == "gold"
    assert [s["prompt"] for s in samples[::k]] == [s["prompt"] for s in samples[k - 1 :: k]]  # k rows a prompt
    # the headline numbers are the samples' own: the judge (gold) re-scored from the replies, win-rate and means
    for s in samples:
        assert s["sft_judge"] == gold.gold_score(s["prompt"], s["sft"])
        assert s["ppo_judge"] == gold.gold_score(s["prompt"], s["ppo"])
    assert m["win_rate_vs_sft"] == win_rate([s["ppo_judge"] for s in samples], [s["sft_judge"] for s in samples])
    low, high = m["win_rate_vs_sft_ci"]
    assert low <= m["win_rate_vs_sft"] <= high and m["win_rate_vs_sft_ci95"] == pytest.approx((high - low) / 2)
    diffs = [s["ppo_judge"] - s["sft_judge"] for s in samples]
    assert m["judge_diff_vs_sft"] == pytest.approx(sum(diffs) / len(diffs))
    assert m["ties_vs_sft"] == pytest.approx(sum(d == 0 for d in diffs) / len(diffs))
    assert m["ppo/judge"] == pytest.approx(sum(s["ppo_judge"] for s in samples) / len(samples))
    assert m["ppo/rm_score"] == pytest.approx(sum(s["ppo_rm"] for s in samples) / len(samples))
    assert m["rm_win_rate_vs_sft"] == win_rate([s["ppo_rm"] for s in samples], [s["sft_rm"] for s in samples])
    assert m["ppo/kl_k3_seq"] >= 0 and m["ppo/kl_k3_token"] >= 0  # k3 is never negative
    assert m["sft/kl_k1_seq"] == pytest.approx(0, abs=1e-4)  # SFT against itself (the reference)
    assert m["alignment_tax"] == pytest.approx(m["ppo/perplexity"] - m["sft/perplexity"])
    assert m["alignment_tax_all"] == pytest.approx(m["ppo/perplexity_all"] - m["sft/perplexity_all"])
    assert m["dpo/perplexity"] > 1 and m["dpo/perplexity_all"] > 1
    assert 0 <= m["ppo/eos_rate"] <= 1 and 0 < m["ppo/distinct_2"] <= 1
    report = (out / "report.md").read_text()
    assert f"**{m['win_rate_vs_sft']:.3f}**" in report and "| prompt | SFT | PPO |" in report
    assert (out / "report.html").read_text().count("<tr>") > 5
    assert (out / "judge_vs_proxy.png").exists() and (out / "reward_vs_kl.png").exists()


def test_the_alignment_tax_is_measured_on_the_demonstrations_the_judge_rates_best(project):
    rows = list(read_jsonl(project / "artifacts/validate/data/sft_test.jsonl"))
    scores = {id(r): gold.gold_score(r["prompt"], r["response"]) for r in rows}
    best = judged_best(rows, GoldJudge(), 0.25)
    cut = min(scores[id(r)] for r in best)
    assert len(best) >= math.ceil(0.25 * len(rows)) and cut > min(scores.values())  # a top quarter, not everything
    assert best == [r for r in rows if scores[id(r)] >= cut]  # every demonstration at or above the cut, in order
    assert judged_best(rows, GoldJudge(), 1.0) == rows
    m = json.loads((project / "artifacts/evaluate/metrics.json").read_text())
    assert (m["tax_demonstrations"], m["demonstrations"]) == (len(best), len(rows))
    report = (project / "artifacts/evaluate/report.md").read_text()
    assert f"perplexity of the {len(best)} held-out demonstrations the judge rates best" in report


def test_pipeline_promotes_and_the_champion_generates_text(project):
    result = json.loads((project / "artifacts/promote/metrics.json").read_text())
    assert result["promoted"] is True and result["champion"] == result["version"]
    client = _client(project)
    assert _alias(client, "champion") == result["version"]
    version = client.get_model_version("rlhf-policy", str(result["version"]))
    assert version.run_id  # the registered version links back to the run that logged it
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    replies = model.predict(["What is 2 plus 3?", "Thank you!"])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_dpo_is_trained_graded_by_the_same_judge_and_a_candidate(project):
    sft = load_file(project / "artifacts/sft/model/model.safetensors")
    dpo = load_file(project / "artifacts/dpo/model/model.safetensors")
    assert any(not torch.equal(dpo[k], sft[k]) for k in sft)  # trained from the SFT model
    m = json.loads((project / "artifacts/evaluate/metrics.json").read_text())
    assert 0.0 <= m["dpo_win_rate_vs_sft"] <= 1.0 and m["dpo_win_rate_vs_sft_ci95"] >= 0
    assert math.isfinite(m["dpo/kl_k1_seq"])  # k1 is an unbiased estimate: near SFT, it can be slightly negative
    assert "| DPO |" in (project / "artifacts/evaluate/report.md").read_text()
    result = json.loads((project / "artifacts/promote/metrics.json").read_text())
    # the registry takes whichever trainer won on the judge's win-rate over SFT (ties go to PPO)
    assert result["trainer"] == ("dpo" if m["dpo_win_rate_vs_sft"] > m["win_rate_vs_sft"] else "ppo")
    version = _client(project).get_model_version("rlhf-policy", str(result["version"]))
    assert version.tags["rlhf.trainer"] == result["trainer"]


def test_promotion_candidate_is_the_trainer_that_won():
    from stages.promote import candidate

    m = {
        "win_rate_vs_sft": 0.6,
        "ppo/kl_k1_seq": 1.0,
        "alignment_tax": 0.1,
        "overoptimisation": False,
        "overoptimisation_reason": "",
        "sft/perplexity": 2.0,
        "dpo/perplexity": 2.5,
        "dpo/kl_k1_seq": 3.0,
    }
    assert candidate(m)["trainer"] == "ppo"  # no DPO graded
    assert candidate(m | {"dpo_win_rate_vs_sft": 0.6})["trainer"] == "ppo"  # a tie keeps PPO
    won = candidate(m | {"dpo_win_rate_vs_sft": 0.7})
    assert won["trainer"] == "dpo" and won["kl"] == 3.0 and won["alignment_tax"] == pytest.approx(0.5)


def test_failed_criterion_leaves_the_champion_and_records_reasons(project, tmp_path):
    client = _client(project)
    champion = _alias(client, "champion")
    candidate = _candidate(project, tmp_path / "ppo_b", seed=1)
    proc = _promote(project, candidate, tmp_path / "promote_b.json", {"min_win_rate_vs_sft": 1.0})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    result = json.loads((tmp_path / "promote_b.json").read_text())
    assert result["promoted"] is False and "win-rate vs SFT" in result["reasons"][0]
    assert _alias(client, "champion") == champion  # untouched
    challenger = client.get_model_version_by_alias("rlhf-policy", "challenger")
    assert int(challenger.version) == result["version"] != champion
    assert "win-rate vs SFT" in challenger.tags["rlhf.promotion_reasons"]
    assert "not promoted" in out


def test_promoting_the_same_weights_twice_changes_nothing(project, tmp_path):
    client = _client(project)
    before = (_alias(client, "champion"), _alias(client, "previous-champion"))
    n_versions = len(client.search_model_versions("name='rlhf-policy'"))
    proc = _promote(project, project / "artifacts/ppo", tmp_path / "again.json")
    proc.communicate(timeout=600)
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == before
    assert len(client.search_model_versions("name='rlhf-policy'")) == n_versions


def test_two_concurrent_promotions_leave_one_consistent_champion(project, tmp_path):
    client = _client(project)
    a, b = _candidate(project, tmp_path / "ppo_c", seed=2), _candidate(project, tmp_path / "ppo_d", seed=3)
    procs = [_promote(project, a, tmp_path / "c.json"), _promote(project, b, tmp_path / "d.json")]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    va, vb = (json.loads((tmp_path / f"{n}.json").read_text())["version"] for n in ("c", "d"))
    champion, previous = _alias(client, "champion"), _alias(client, "previous-champion")
    # both passed: they were serialised, so the later one is champion and the earlier one previous-champion
    assert {champion, previous} == {va, vb}
    later = json.loads((tmp_path / ("c.json" if champion == va else "d.json")).read_text())
    assert later["champion_before"] == previous


def test_overoptimisation_flag_on_synthetic_monitor():
    rising_proxy_falling_judge = [
        {"step": 0, "rm_score": 0.0, "judge": 0.5},
        {"step": 5, "rm_score": 0.5, "judge": 0.8},
        {"step": 10, "rm_score": 1.5, "judge": 0.1},
    ]
    flagged, reason = evaluate.overoptimisation(rising_proxy_falling_judge, 0.1, 0.1)
    assert flagged and "over-optimisation" in reason and "step 5" in reason
    kept_best = [{**m, "kept": int(m["step"] == 5)} for m in rising_proxy_falling_judge]
    flagged, reason = evaluate.overoptimisation(kept_best, 0.1, 0.1)
    assert not flagged and "keeping the best checkpoint undid" in reason  # handled, not only detected
    both_rising = [{"step": 0, "rm_score": 0.0, "judge": 0.1}, {"step": 5, "rm_score": 1.0, "judge": 0.9}]
    flagged, reason = evaluate.overoptimisation(both_rising, 0.1, 0.1)
    assert not flagged and reason.endswith("the kept step 5 has the best judge's score of the 2 checkpoints")
    # the same drop of 0.7, but the monitor's paired standard error is 0.4: within 2 of them, noise, not a finding
    noisy = [{**m, "judge_minus_kept_se": 0.4 if m["step"] == 5 else None} for m in rising_proxy_falling_judge]
    flagged, reason = evaluate.overoptimisation(noisy, 0.1, 0.1, 2.0)
    assert not flagged and "within 2 standard errors (0.400)" in reason
    clear = [{**m, "judge_minus_kept_se": 0.2 if m["step"] == 5 else None} for m in rising_proxy_falling_judge]
    assert evaluate.overoptimisation(clear, 0.1, 0.1, 2.0)[0] is True


def test_deliberate_overoptimisation_raises_the_flag_and_blocks_promotion(tmp_path):
    """A proxy RM with a known exploitable bias (longer is better) and no KL penalty: the proxy climbs, gold falls.
    PPO keeps its last step here (`keep: last`): the monitor catches the over-optimised policy and promotion refuses
    it (with the default `keep: best` the run would output its best checkpoint instead)."""
    # An SFT policy good enough to lose gold (the 1-epoch tiny one sits at the judge's floor), no KL penalty. The
    # learning rate is where fp32 PPO climbs the biased proxy while gold falls (RM +0.39 and gold -0.84 from the best
    # checkpoint); at 2e-3 the policy collapses to one degenerate reply and both scores fall.
    overrides = {
        **PASSING,
        "task": {"n_sft": 1500},
        "sft": {"epochs": 6, "learning_rate": 0.003},
        "ppo": {
            **PASSING["ppo"],
            "estimator": "gae",  # the calibration below is GAE's (RLOO climbs this proxy slower in 10 steps)
            "kl_coef": 0.0,
            "missing_eos_penalty": 0.0,
            "learning_rate": 5e-4,
            "num_steps": 10,
            "checkpoint_every": 2,
            "n_monitor": 24,
            "response_length": 32,
            "threads": 1,
            "kl_guard": {"max_kl": 1e9, "max_approxkl": 1e9},
            "keep": "last",
        },
        "promote": {**PASSING["promote"], "block_on_overoptimisation": True},
        "dpo": {"enabled": False},
        # the proxy learns the biased offline labels alone (on-policy comparisons by the simulated labeler would
        # teach it the truth)
        "comparisons": {"labeler": "none"},
        "reward": {"offline_pairs": None},
    }  # a DPO policy that beat this PPO would be promoted instead
    project = make_project(tmp_path / "proj", overrides)
    for name in ("preferences.jsonl", "preferences_test.jsonl"):  # the biased labeler: the longer reply wins
        path = project / "data" / name
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [
            {
                **r,
                "chosen": max(r["chosen"], r["rejected"], key=len),
                "rejected": min(r["chosen"], r["rejected"], key=len),
            }
            for r in rows
            if len(r["chosen"]) != len(r["rejected"])
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run([sys.executable, "-m", "dvc", "add", "-q", "data"], project)
    run([str(BIN / "rlhf"), "run"], project)

    monitor = (project / "artifacts/ppo/monitor.csv").read_text()
    metrics = json.loads((project / "artifacts/evaluate/metrics.json").read_text())
    assert metrics["overoptimisation"] is True, (metrics["overoptimisation_reason"], monitor)
    result = json.loads((project / "artifacts/promote/metrics.json").read_text())
    assert result["promoted"] is False and any("over-optimisation" in r for r in result["reasons"])


def test_cli_promote_by_run_id_and_eval_by_model_uri(project, tmp_path):
    """For people who decided in the MLflow UI: `rlhf promote --run-id [--force]`, then `rlhf eval --model-uri`."""
    client = _client(project)
    candidate = _candidate(project, tmp_path / "ppo_e", seed=4)
    proc = _promote(project, candidate, tmp_path / "e.json", {"min_win_rate_vs_sft": 1.0})
    proc.communicate(timeout=600)
    rejected = json.loads((tmp_path / "e.json").read_text())["version"]
    source_run = client.get_model_version("rlhf-policy", str(rejected)).tags["rlhf.source_run_id"]
    champion = _alias(client, "champion")

    refused = run([str(BIN / "rlhf"), "promote", "--run-id", source_run], project, check=False)
    assert refused.returncode == ExitCode.GATE and "win-rate vs SFT" in refused.stderr
    assert _alias(client, "champion") == champion

    run([str(BIN / "rlhf"), "promote", "--run-id", source_run, "--force"], project)
    assert _alias(client, "champion") == rejected and _alias(client, "previous-champion") == champion

    run(
        [str(BIN / "rlhf"), "eval", "--model-uri", "models:/rlhf-policy@champion", "--out", str(tmp_path / "ev")],
        project,
    )
    assert "win-rate of PPO over SFT" in (tmp_path / "ev/report.md").read_text()

    unknown = run(
        [str(BIN / "rlhf"), "eval", "--model-uri", "models:/no-such-model/1", "--out", str(tmp_path / "x")],
        project,
        check=False,
    )
    assert unknown.returncode == ExitCode.BAD_INPUT and "cannot load models:/no-such-model/1" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_ppo_faces_the_matched_best_of_n_or_past_the_ladder_its_best_rung():
    ladder = {"bon/1/kl": 0.0, "bon/4/kl": 0.64, "bon/16/kl": 1.84}
    ladder |= {"bon/1/win_rate_vs_sft": 0.47, "bon/4/win_rate_vs_sft": 0.62, "bon/16/win_rate_vs_sft": 0.59}
    ladder |= {f"bon/{n}/judge": 0.0 for n in (1, 4, 16)}
    inside = ladder | {"ppo/kl_k1_seq": 1.0, "win_rate_vs_sft": 0.60}
    m = evaluate.matched_best_of_n(inside)
    assert (m["bon_matched_n"], m["ppo_beats_matched_bon"]) == (16, True)  # 16 is the first rung with KL >= 1.0
    assert (m["bon_best_n"], m["ppo_beats_best_bon"]) == (4, False)
    past = ladder | {"ppo/kl_k1_seq": 7.3, "win_rate_vs_sft": 0.69}
    m = evaluate.matched_best_of_n(past)
    assert m["bon_matched_n"] is None and m["ppo_beats_matched_bon"] is None and m["ppo_beats_best_bon"] is True
    assert "past the best-of-n ladder" in evaluate._matched(past | m) and "best-of-4" in evaluate._matched(past | m)
    assert evaluate.matched_best_of_n({"ppo/kl_k1_seq": 1.0, "win_rate_vs_sft": 0.6})["bon_matched_n"] is None

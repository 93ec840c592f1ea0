"""A reward ensemble (reward.ensemble, ppo.ensemble_penalty): the score PPO climbs is the members' mean normalised
score minus a multiple of their spread, and the reward stage trains and saves the members PPO loads."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.lib.io import write_json
from stages.lib.rewards import RewardEnsemble, RewardModel
from tests.helpers import OPEN_GATE, make_project, run, tiny_policy_and_rm


def _second_member(rm_dir: Path, norm: dict) -> None:
    """Member 1: the same backbone with its own head and norm, where the reward stage puts it, and the members'
    normalised scores of SFT replies (here made up: the ensemble's normalisation is what is tested)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(7)
    other = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
    torch.nn.init.normal_(other.score.weight, std=1.0)
    other.save_pretrained(rm_dir / "ensemble" / "1")
    write_json(rm_dir / "ensemble" / "1" / "norm.json", norm)
    write_json(rm_dir / "ensemble" / "norm_z.json", NORM_Z)


NORM_Z = [[-1.0, 0.0, 1.0, 0.5], [-0.5, 0.5, 1.5, -1.0]]  # (members, SFT replies)


def test_the_ensemble_scores_mean_minus_penalty_times_spread(tmp_path):
    _, rm_dir = tiny_policy_and_rm(tmp_path)
    write_json(tmp_path / "norm.json", {"mean": 0.5, "std": 2.0})
    alone = RewardEnsemble.load_all(rm_dir, tmp_path / "norm.json", penalty=1.0)
    assert type(alone) is RewardModel  # no members: the reward model as it was

    _second_member(rm_dir, {"mean": -1.0, "std": 0.5})
    prompts, replies = ["Human: hi Assistant:"] * 3, ["hello", "hello there", "there"]
    for penalty in (0.0, 0.5):
        ensemble = RewardEnsemble.load_all(rm_dir, tmp_path / "norm.json", penalty=penalty)
        assert isinstance(ensemble, RewardEnsemble) and len(ensemble.models) == 2
        z = torch.tensor([m.normalise(m.score_texts(prompts, replies)) for m in ensemble.members])  # (2, 3)
        assert not torch.allclose(z[0], z[1])  # two different members, or the spread would be trivially 0
        combined = z.mean(0) - penalty * z.std(0)
        sft = torch.tensor(NORM_Z).mean(0) - penalty * torch.tensor(NORM_Z).std(0)  # c over the SFT replies
        expected = (combined - sft.mean()) / sft.std()  # normalised as a lone model's score: SFT's spread is 1
        assert torch.allclose(
            torch.tensor(ensemble.normalise(ensemble.score_texts(prompts, replies))), expected, atol=1e-5
        )


@pytest.mark.slow
def test_the_reward_stage_trains_members_on_resamples_and_ppo_scores_with_them(tmp_path):
    project = make_project(
        tmp_path / "p",
        {"reward_gate": OPEN_GATE, "reward": {"ensemble": 2}, "ppo": {"ensemble_penalty": 1.0, "num_steps": 2}},
    )
    run([str(Path(sys.executable).parent / "rlhf"), "run", "ppo"], project)
    model = project / "artifacts/reward/model"
    first, member = load_file(model / "model.safetensors"), load_file(model / "ensemble/1/model.safetensors")
    assert first.keys() == member.keys() and any(not torch.equal(first[k], member[k]) for k in first)
    norm = json.loads((model / "ensemble/1/norm.json").read_text())
    assert norm["std"] > 0 and norm["n"] == json.loads((project / "artifacts/reward/norm.json").read_text())["n"]
    metrics = json.loads((project / "artifacts/reward/metrics.json").read_text())
    assert 0.0 <= metrics["ensemble_on_policy_accuracy"] <= 1.0
    ppo = json.loads((project / "artifacts/ppo/metrics.json").read_text())
    assert ppo["steps_done"] == 2
    steps = list(csv.DictReader((project / "artifacts/ppo/kl.csv").read_text().splitlines()))
    assert len(steps) == 2 and all(float(s["objective/rm_spread"]) > 0 for s in steps)  # PPO scored with both

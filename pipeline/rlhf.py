"""The Python API users know from DeepSpeed-Chat, used by the PPO stage itself:

    engine = RLHFEngine(actor_model_name_or_path=..., critic_model_name_or_path=..., tokenizer=...,
                        num_total_iters=..., args=cfg)
    trainer = PPOTrainer(engine=engine, args=cfg)
    out = trainer.generate_experience(prompt_batch)      # {"input_ids", "attention_mask"} of prompts
    actor_loss, critic_loss = trainer.train_rlhf(out)

`args` is the pipeline's RunConfig; its stage.ppo section holds every PPO setting.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import RunConfig
from pipeline.dist import collective_device, gather_rows, rank, world_size
from pipeline.engine import inference_engine, initialize, tp_degree, unwrap, zero3_construction
from pipeline.export import save_hf
from pipeline.models import RewardModel, load_causal_lm
from pipeline.rewards import score_texts
from pipeline.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    actor_loss,
    aggregate_loss,
    answer_mask,
    critic_loss,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    kl_penalized_rewards,
    last_index,
    logprobs_of_labels,
    masked_mean,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_kl_rewards,
)
from pipeline.rollout import Rollout, RolloutEngine, check_backend, position_ids
from pipeline.training import NonFiniteGuard


def forward_flops(n_params: int, n_layers: int, hidden: int, head_params: int, batch: int, seq_len: int,
                  head_len: int = 0) -> float:
    """FLOPs of one forward pass over (batch, seq_len) tokens: 2 per parameter per token except the
    (vocab x embedding) matrix, which costs 2 per entry only at the `head_len` positions the LM
    head projects (0 for value models, whose embedding is a lookup), plus attention scores and
    mixing, 4 * layers * hidden * seq_len^2 per sequence. Backward costs 2x forward; gradient
    checkpointing adds one more forward."""
    body = 2.0 * (n_params - head_params) * batch * seq_len
    head = 2.0 * head_params * batch * head_len
    return body + head + 4.0 * n_layers * hidden * batch * seq_len**2


def model_size(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(parameters, layers, hidden size, vocab x embedding size) of a model, ZeRO-3 partitioned or not,
    LoRA included."""
    module = unwrap(model)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    config = getattr(module, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    embed = getattr(config, "word_embed_proj_dim", 0) or hidden  # OPT-350m embeds at 512
    return int(n_params), int(layers), int(hidden), int((getattr(config, "vocab_size", 0) or 0) * embed)


def answer_logits(model, answer_len: int, **inputs) -> torch.Tensor:
    """Logits predicting the last `answer_len` tokens, (B, answer_len, V): the LM head projects only
    those positions (transformers' logits_to_keep takes their indices), not the whole prompt (29% of
    a PPO step), and no slice of the logits is taken (its backward filled a (B, T + 1, V) zero tensor)."""
    length = inputs["input_ids"].shape[1]
    keep = torch.arange(length - answer_len - 1, length - 1, device=inputs["input_ids"].device)
    return model(**inputs, use_cache=False, logits_to_keep=keep).logits


def ptx_enabled(args: RunConfig) -> bool:
    """Mixed training is on: a PTX text source and a positive coefficient."""
    return bool(args.data_blend.ptx_path) and args.stage.ppo.unsup_coef > 0


@dataclass
class Experience:
    """A batch of rollouts scored by the four models (or fewer: no critic for a critic-free estimator,
    a reward function instead of a reward model): what `generate_experience` returns and `train_rlhf`
    learns from. B = rows (prompts x samples_per_prompt, each prompt's samples consecutive),
    Lp = prompt length (left-padded), T = answer length (right-padded after each answer's end), L = Lp + T."""

    seq: torch.Tensor  # (B, L) prompt + answer token ids
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens (the eos included)
    position_ids: torch.Tensor  # (B, L) positions counted over real tokens (left padding skipped)
    answer_mask: torch.Tensor  # (B, T) 1 on answer tokens up to and including the first eos
    logprobs: torch.Tensor  # (B, T) the actor's log-probs of the answer tokens when they were sampled (taken while decoding)
    entropy: torch.Tensor  # (B, T) the actor's entropy at each answer position when it was sampled
    ref_logprobs: torch.Tensor  # (B, T) the frozen reference model's
    values: torch.Tensor  # (B, T) the critic's value before each answer token (0 without a critic)
    scores: torch.Tensor  # (B,) the reward model's score at the last answer token
    train_scores: torch.Tensor  # (B,) the scores PPO learns from (normalised with stage.ppo.normalize_reward)
    prompt_len: int  # Lp
    # Critic-free estimators: computed over the whole batch (groups intact) before it is cut into
    # minibatches; None for GAE, which computes them per minibatch in train_rlhf.
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)
    kl: torch.Tensor | None = None  # (B, T) the KL estimate per answer token

    @property
    def answer(self) -> torch.Tensor:
        """(B, T) the answer tokens."""
        return self.seq[:, self.prompt_len:]

    def minibatches(self, size: int) -> Iterator[Experience]:
        """Consecutive row slices of `size` rows each (PPO's minibatches)."""
        for start in range(0, self.seq.shape[0], size):
            yield dataclasses.replace(self, **{f.name: getattr(self, f.name)[start: start + size]
                                               for f in dataclasses.fields(self)
                                               if f.name != "prompt_len" and getattr(self, f.name) is not None})


class RLHFEngine:
    """The four models of step 3: trained actor and critic (DeepSpeed engines), frozen reference
    (a copy of the starting actor) and frozen reward model; plus the actor's EMA when asked. A
    critic-free estimator (stage.ppo.advantage_estimator) builds no critic (`critic` is None), a
    reward function (stage.ppo.reward) no reward model (`reward` is None).

    The reference and reward models are sharded like the actor and the critic when those run
    ZeRO-3, else plain frozen modules on the device; stage.ppo.offload_reference_model and
    offload_reward_model keep their weights in host RAM instead (DeepSpeed ZeRO-3 inference engines
    with parameter offload). The EMA (an ActorEMA) lives in host RAM when the actor or the
    reference model is offloaded."""

    def __init__(self, actor_model_name_or_path: str | Path, critic_model_name_or_path: str | Path | None, tokenizer,
                 num_total_iters: int, args: RunConfig, reward_model_name_or_path: str | Path | None = None):
        p = args.stage.ppo
        self.tokenizer, self.args = tokenizer, args
        trust = args.model.trust_remote_code

        def actor_model():
            return load_causal_lm(str(actor_model_name_or_path), tokenizer, args.dtype, args.model.dropout, trust)

        check_backend(p.generation)  # before any model is loaded: a clear error, early
        with zero3_construction(args, p.actor.strategy):
            actor = actor_model()
        self.actor = initialize(args, actor, p.actor, "stage.ppo.actor", micro_batch=p.per_device_training_batch_size,
                                grad_accum=1, total_steps=num_total_iters)
        self.ref = inference_engine(args, actor_model, p.actor.strategy, p.offloads_frozen("ref"))
        self.ema = None
        if p.enable_ema:
            device = "cpu" if p.actor.strategy.offload or p.offloads_frozen("ref") else self.actor.device
            self.ema = ActorEMA(self.actor, p.ema_beta, device)
        self.critic = self.reward = None
        if p.needs_critic:
            with zero3_construction(args, p.critic.strategy):  # with a reward function, any causal LM may start it
                critic = RewardModel.from_pretrained(critic_model_name_or_path, args.dtype, args.model.dropout, trust,
                                                     fresh_head_tokenizer=None if p.reward_model else tokenizer)
            self.critic = initialize(args, critic, p.critic, "stage.ppo.critic", micro_batch=p.per_device_training_batch_size,
                                     grad_accum=1, total_steps=num_total_iters // (2 if ptx_enabled(args) else 1))
            self.critic.train()
        if p.reward_model:
            reward_path = reward_model_name_or_path or critic_model_name_or_path
            self.reward = inference_engine(args, lambda: RewardModel.from_pretrained(reward_path, args.dtype, None, trust),
                                           p.critic.strategy, p.offloads_frozen("reward"))
        self.sizes = {name: model_size(getattr(self, name)) for name in ("actor", "ref", "critic", "reward")
                      if getattr(self, name) is not None}
        # Training layout (from_pretrained returns eval mode): dropout as configured, and gradient
        # checkpointing, which transformers applies only in train mode.
        self.actor.train()

    @property
    def device(self) -> torch.device:
        return self.actor.device


def local_part(param: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter (flat, padded), or the parameter itself."""
    return getattr(param, "ds_tensor", param)


class ActorEMA:
    """Exponential moving average of the actor (DeepSpeed-Chat's --enable_ema): after each actor
    update, ema = beta * ema + (1 - beta) * actor.

    Only trainable parameters are averaged (frozen ones, e.g. the base under LoRA, never move); in
    fp32, because in bf16 (1 - 0.992) x a small change rounds to nothing. Under ZeRO-3 each rank
    averages its own partition of each parameter: no gather while training, 4 bytes x P / N per
    rank. `state_dict()` is per rank (checkpoints); `save()` writes the averaged actor: rank 0 then
    holds the whole average in host RAM, in the actor's dtype."""

    def __init__(self, actor, beta: float, device):
        self.actor, self.beta = unwrap(actor), beta
        self.params = [param for param in self.actor.parameters() if param.requires_grad]
        self.sharded = any(hasattr(param, "ds_tensor") for param in self.params)  # else equal on every rank
        self.values = [local_part(param).detach().to(device, torch.float32, copy=True) for param in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for value, param in zip(self.values, self.params, strict=True):
            value.mul_(self.beta).add_(local_part(param).detach().to(value.device, value.dtype), alpha=1.0 - self.beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): value for i, value in enumerate(self.values)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = [state.get(str(i)) for i in range(len(self.values))]
        if len(state) != len(self.values) or any(s is None or s.shape != v.shape for s, v in zip(saved, self.values)):
            raise ValueError("the checkpoint's EMA does not match this actor's trainable parameters"
                             + (" partitioned over this number of ranks (ZeRO-3 splits them by the world size)" if self.sharded else "")
                             + ": resume with the LoRA settings and world size it was written with, or run.resume=never")
        for value, s in zip(self.values, saved, strict=True):
            value.copy_(s)

    @torch.no_grad()
    def whole_value(self, index: int) -> torch.Tensor | None:
        """On rank 0, the average of trainable parameter `index`, whole, on the CPU; None on the
        other ranks. Collective under ZeRO-3 (its partitions are gathered to rank 0)."""
        value, param = self.values[index], self.params[index]
        if not self.sharded:
            return value.cpu() if rank() == 0 else None
        part = value.to(collective_device())
        parts = [torch.empty_like(part) for _ in range(world_size())] if rank() == 0 else None
        torch.distributed.gather(part, parts, dst=0)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu() if rank() == 0 else None

    def full_values(self) -> list[torch.Tensor] | None:
        """whole_value of every trainable parameter (in the order of actor.parameters()) on rank 0."""
        values = [self.whole_value(i) for i in range(len(self.params))]
        return values if rank() == 0 else None

    def save(self, path: str | Path, tokenizer) -> None:
        """Write the averaged actor in Hugging Face format, as save_hf writes the actor (LoRA merged,
        the actor's dtype), gathering one parameter's average at a time. Collective."""
        index = {id(param): i for i, param in enumerate(self.params)}
        save_hf(self.actor, path, tokenizer, lambda param: self.whole_value(index[id(param)]) if id(param) in index else None)


class RunningMoments:
    """Running mean and std of reward scores (Chan et al.'s parallel update), for normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        batch_mean, batch_var, n = float(x.mean()), float(x.var(unbiased=False)), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class PPOTrainer:
    def __init__(self, engine: RLHFEngine, args: RunConfig):
        self.engine, self.args, self.p = engine, args, args.stage.ppo
        p = self.p
        self.kl_ctl = (AdaptiveKLController(p.kl_ctl, p.kl_target, p.kl_horizon) if p.kl_target
                       else FixedKLController(p.kl_ctl))
        self.reward_moments = RunningMoments()
        self.rollout = RolloutEngine(engine.actor, engine.tokenizer, p.generation)
        self.eos_id = engine.tokenizer.eos_token_id
        self.last_stats: dict[str, float] | None = {}  # None after an update skipped for a non-finite loss
        self.guard = NonFiniteGuard()
        self.counters: dict[str, float] = {}

    def _count(self, **amounts: float) -> None:
        for key, value in amounts.items():
            self.counters[key] = self.counters.get(key, 0.0) + value

    def pop_counters(self) -> dict[str, float]:
        """Seconds, FLOPs and tokens accumulated since the last call: generation_s (sampling with the
        actor's log-probs), experience_s (the reference, critic and reward forwards), generation_flops, experience_flops, training_flops,
        answer_tokens, sequences; then reset."""
        out, self.counters = self.counters, {}
        return out

    def _flops(self, role: str, batch: int, seq_len: int, head_len: int = 0) -> float:
        """0 for a model this run does not build (no critic, a reward function)."""
        if role not in self.engine.sizes:
            return 0.0
        return forward_flops(*self.engine.sizes[role], batch, seq_len, head_len)

    def _train_factor(self, role: str) -> float:
        """fwd + bwd = 3 forwards; with gradient checkpointing 4 (DeepSpeed-Chat's convention)."""
        return 4.0 if getattr(self.p, role).strategy.gradient_checkpointing else 3.0

    # ------------------------------------------------------------------ experience

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict) -> Experience:
        """Sample stage.ppo.samples_per_prompt answers to each left-padded prompt (input_ids,
        attention_mask: (B, Lp); "reference": B strings, the reference answers a reward function checks
        against), then score them; a critic-free estimator's advantages are computed here, over the
        whole batch. generation_s counts the sampling with the actor's log-probs, which the decoding
        computes; experience_s the scoring: between them, the whole call."""
        t0 = time.perf_counter()
        e, n = self.engine, self.p.samples_per_prompt
        prompt_mask = prompt_batch["attention_mask"].to(e.device).repeat_interleave(n, dim=0)
        prompt_ids = prompt_batch["input_ids"].to(e.device).repeat_interleave(n, dim=0)
        given = prompt_batch.get("reference") or [None] * prompt_batch["input_ids"].shape[0]
        references = [reference for reference in given for _ in range(n)]  # as repeat_interleave
        rollout = self.rollout.rollout(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        exp = self.score(rollout, prompt_mask, references)
        if not self.p.needs_critic:
            exp.advantages, exp.returns, exp.kl = self.advantages(exp)
        t2 = time.perf_counter()

        batch, length = exp.seq.shape
        answer_len = length - exp.prompt_len
        actor_forwards = 1 if self.rollout.logprobs_while_decoding else 2
        self._count(generation_s=t1 - t0, experience_s=t2 - t1, sequences=batch, answer_tokens=float(exp.answer_mask.sum()),
                    generated_positions=batch * answer_len,
                    generation_flops=actor_forwards * self._flops("actor", batch, length, answer_len),
                    experience_flops=self._flops("ref", batch, length, answer_len)
                    + sum(self._flops(r, batch, length) for r in ("critic", "reward")))
        return exp

    @torch.no_grad()
    def score(self, rollout: Rollout, prompt_mask: torch.Tensor, references: list[str | None] | None = None) -> Experience:
        """What the other models make of a rollout: the frozen reference's log-probs, the critic's
        values (zeros without a critic) and the scores of the frozen reward model or of the reward
        function (stage.ppo.reward; references: a reference answer per row), one forward each
        (prompt_mask: (B, Lp))."""
        e = self.engine
        seq, prompt_len = rollout.seq, prompt_mask.shape[1]
        answer = seq[:, prompt_len:]
        mask = answer_mask(answer, self.eos_id)
        attention = torch.cat([prompt_mask, mask], dim=1)
        positions = position_ids(attention)
        inputs = {"input_ids": seq, "attention_mask": attention, "position_ids": positions}
        ref_logprobs = logprobs_of_labels(answer_logits(e.ref, answer.shape[1], **inputs), answer)
        if e.critic is not None:
            critic = unwrap(e.critic)
            was_training = critic.training
            critic.eval()
            values = e.critic(seq, attention, positions)[:, prompt_len - 1: -1]
            critic.train(was_training)
        else:
            values = torch.zeros(answer.shape, device=seq.device)
        if e.reward is not None:
            reward_values = e.reward(seq, attention, positions)
            rows = torch.arange(seq.shape[0], device=seq.device)
            scores = reward_values[rows, prompt_len + last_index(mask)].float()
        else:
            scores = self.function_scores(seq[:, :prompt_len], prompt_mask, answer, mask, references)
        return Experience(seq=seq, attention_mask=attention, position_ids=positions, answer_mask=mask,
                          logprobs=rollout.logprobs, entropy=rollout.entropy, ref_logprobs=ref_logprobs,
                          values=values.float(), scores=scores, train_scores=self._train_scores(scores),
                          prompt_len=prompt_len)

    def function_scores(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor,
                        mask: torch.Tensor, references: list[str | None] | None) -> torch.Tensor:
        """stage.ppo.reward's function over the decoded rows (special tokens dropped). prompts, prompt_mask:
        (B, Lp); answers, mask: (B, T) -> (B,) float32 on the answers' device."""
        decode = self.engine.tokenizer.batch_decode
        prompt_texts = decode([row[m.bool()].tolist() for row, m in zip(prompts, prompt_mask)], skip_special_tokens=True)
        answer_texts = decode([row[m.bool()].tolist() for row, m in zip(answers, mask)], skip_special_tokens=True)
        refs = references if references is not None else [None] * len(answer_texts)
        return torch.tensor(score_texts(self.p.reward, prompt_texts, answer_texts, refs), device=answers.device)

    def _train_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores PPO learns from: normalised by running statistics over every rank's batch
        (updated once per experience batch) when stage.ppo.normalize_reward, else as they are."""
        if not self.p.normalize_reward:
            return scores
        self.reward_moments.update(gather_rows(scores, tp_degree(self.p.actor.strategy)))  # one copy per TP group
        return self.reward_moments.normalize(scores)

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advantages by stage.ppo.advantage_estimator. The KL penalty (kl_ctl x the k1 or k3 estimate) is in
        the rewards when stage.ppo.kl_placement=reward (else train_rlhf puts it in the loss):
          gae: per-token rewards (-kl_coef x kl, plus the clipped score on the last answer token), GAE over
               the critic's values, whitened when stage.ppo.whiten_advantages (DeepSpeed-Chat's PPO);
          reinforce_pp: the same per-token rewards, their returns whitened over the batch;
          grpo / rloo: one reward per answer (clipped score - kl_coef x its summed kl), baselined within
               its prompt's group of samples_per_prompt answers, the same advantage on every token.
        Returns (advantages, returns, kl), each (B, T), 0 after the answers."""
        p, mask = self.p, exp.answer_mask
        coef = self.kl_ctl.value if p.kl_placement == "reward" else 0.0
        if p.advantage_estimator in ("gae", "reinforce_pp"):
            rewards, kl = kl_penalized_rewards(exp.logprobs, exp.ref_logprobs, exp.train_scores, mask,
                                               coef, p.clip_reward_value, p.kl_estimator)
            if p.advantage_estimator == "reinforce_pp":
                advantages, returns = reinforce_pp_advantages(rewards, mask, p.gamma)
                return advantages, returns, kl
            advantages, returns = gae_advantages(exp.values, rewards, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = masked_whiten(advantages, mask) * mask
            return advantages, returns, kl
        scores = exp.train_scores.clamp(-p.clip_reward_value, p.clip_reward_value)
        rewards, kl = sequence_kl_rewards(scores, exp.logprobs, exp.ref_logprobs, mask, coef, p.kl_estimator)
        if p.advantage_estimator == "grpo":
            per_answer = grpo_advantages(rewards, p.samples_per_prompt, p.scale_advantages_by_std)
        else:
            per_answer = rloo_advantages(rewards, p.samples_per_prompt)
        return per_answer[:, None] * mask, rewards[:, None] * mask, kl

    def train_rlhf(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """One PPO update of actor and critic (no critic: the actor alone) on an experience batch; returns
        (actor_loss, critic_loss), the critic's 0 without one. With stage.ppo.kl_placement=loss the actor
        loss adds kl_ctl x the KL estimate (k1 or k3) of the current policy, aggregated as the policy loss.

        The EMA is not touched here: call `update_ema()` after the step (and its PTX step, if any)."""
        p, e = self.p, self.engine
        mask, start, answer = exp.answer_mask, exp.prompt_len, exp.answer
        if exp.advantages is not None:
            advantages, returns, kl = exp.advantages, exp.returns, exp.kl
        else:
            advantages, returns, kl = self.advantages(exp)
        inputs = {"input_ids": exp.seq, "attention_mask": exp.attention_mask, "position_ids": exp.position_ids}
        logits = answer_logits(e.actor, answer.shape[1], **inputs)
        logprobs = logprobs_of_labels(logits, answer)
        horizon = p.generation.max_new_tokens
        a_loss, a_stats = actor_loss(logprobs, exp.logprobs, advantages, mask, p.cliprange, p.loss_aggregation, horizon)
        if p.kl_placement == "loss":
            kl_loss = aggregate_loss(kl_estimate(logprobs, exp.ref_logprobs, p.kl_estimator), mask, p.loss_aggregation, horizon)
            a_loss = a_loss + self.kl_ctl.value * kl_loss
        c_loss, c_stats = torch.zeros((), device=a_loss.device), {}
        if e.critic is not None:
            values = e.critic(exp.seq, exp.attention_mask, exp.position_ids)[:, start - 1: -1].float()
            c_loss, c_stats = critic_loss(values, exp.values, returns, mask, p.cliprange_value)
        # A non-finite loss skips the whole update on every rank (before any backward: no NaN applied).
        if not self.guard.ok(a_loss + c_loss, "ppo update"):
            self.last_stats = None
            return a_loss.detach(), c_loss.detach()
        e.actor.backward(a_loss)
        e.actor.step()
        if e.critic is not None:
            e.critic.backward(c_loss)
            e.critic.step()

        batch, length = exp.seq.shape
        self._count(training_flops=self._train_factor("actor") * self._flops("actor", batch, length, answer.shape[1])
                    + self._train_factor("critic") * self._flops("critic", batch, length))
        with torch.no_grad():
            self.last_stats = {
                "reward": float(exp.scores.mean()),
                "reward_normalized": float(exp.train_scores.mean()),
                "kl": float((kl.sum(1)).mean()),
                # The actor's entropy when it sampled these answers (no pass over the vocabulary here).
                "entropy": float(masked_mean(exp.entropy, mask)),
                "clip_frac": float(a_stats["clip_frac"]),
                "approx_kl": float(a_stats["approx_kl"]),
                **{key: float(value) for key, value in c_stats.items()},  # value_error, value_clip_frac
                "answer_length": float(mask.sum(1).float().mean()),
                "advantage": float(masked_mean(advantages, mask)),
                "return": float(masked_mean(returns, mask)),
            }
        return a_loss.detach(), c_loss.detach()

    def train_unsupervised(self, batch: dict[str, torch.Tensor], unsup_coef: float | None = None) -> torch.Tensor:
        """Mixed training (PTX): unsup_coef x the causal-LM loss on a pretraining batch
        (input_ids, attention_mask, labels: (B, L)), its own optimizer step. Returns the LM loss."""
        e = self.engine
        coef = self.p.unsup_coef if unsup_coef is None else unsup_coef
        batch = {k: v.to(e.device) for k, v in batch.items()}
        loss = e.actor(**batch, use_cache=False).loss
        e.actor.backward(coef * loss)
        e.actor.step()
        batch_size, length = batch["input_ids"].shape
        self._count(training_flops=self._train_factor("actor") * self._flops("actor", batch_size, length, length))
        return loss.detach()

    @torch.no_grad()
    def heldout_accuracy(self, prompt_batches: Iterable[dict], greedy: bool) -> tuple[int, int]:
        """(right, answered): the actor's answers to held-out prompt batches (collate_prompts, with
        references) that stage.ppo.reward's function scores >= 0.5; greedy, or sampled as in training
        (stage.ppo.generation). The same work on every rank (ZeRO-3's gathers are collective)."""
        gen = dataclasses.replace(self.p.generation, do_sample=False, temperature=1.0, top_k=0, top_p=1.0) \
            if greedy else self.p.generation
        engine = RolloutEngine(self.engine.actor, self.engine.tokenizer, gen, show_progress=False)
        right = answered = 0
        for batch in prompt_batches:
            prompt_mask = batch["attention_mask"].to(self.engine.device)
            seq = engine.rollout(batch["input_ids"].to(self.engine.device), prompt_mask).seq
            prompt_len = prompt_mask.shape[1]
            answer = seq[:, prompt_len:]
            scores = self.function_scores(seq[:, :prompt_len], prompt_mask, answer, answer_mask(answer, self.eos_id),
                                          batch.get("reference"))
            right += int((scores >= 0.5).sum())
            answered += len(scores)
        return right, answered

    def update_ema(self) -> None:
        """The EMA's update after an actor step (see ActorEMA); nothing when EMA is off."""
        if self.engine.ema is not None:
            self.engine.ema.update()

    def update_kl_controller(self, kl_per_sequence: float, n_samples: int) -> None:
        self.kl_ctl.update(kl_per_sequence, n_samples)

"""The rollout ("hybrid") engine: switches the actor from its training layout to a generation
layout for one `generate` call and back.

Generation layout: eval mode (no dropout), KV cache on, gradient checkpointing off, ZeRO-3
parameters gathered once for the whole call (and DeepSpeed's per-module fetch/release hooks
taken off meanwhile, so no token triggers a gather), LoRA adapters merged into the weights when
`merge_lora` is set (and the exact original weights restored afterwards), caches released at
the end. An actor too large to gather on one device (generation.gather_weights=false, which the
planner sets then) keeps DeepSpeed's hooks instead: each module is fetched at every decode step,
slow but within memory, with the ranks stepping together. A tensor-parallel actor (DeepSpeed
AutoTP, strategy.tp_degree > 1) generates on its shards as they are: the ranks of a group get the
same prompts and draw the same numbers (one seed on every rank), and its layers all-reduce their
outputs; under ZeRO-3 the "gather" brings in this rank's shards only, never the whole model. On
rank 0 in a terminal a transient bar counts the decode steps of each call.

Decoding (the default, generation.cache=dynamic): a loop of our own over the model's forward with
transformers' KV cache. Each step takes the last position's logits once for three things
(pipeline.rl_math.next_tokens): the next token (argmax, or a draw by inverse transform sampling with
one uniform number per row, from the distribution transformers' temperature / top-k / top-p warpers
give), its log-prob under the actor and the actor's entropy there. So PPO needs no second actor
forward for the old log-probs, and sampling costs no V exponential draws per row, which on CPU cost
twice the tiny model's forward (issue #18). transformers' generate keeps the static cache
(generation.cache=static: preallocated, a compiled decode step on CUDA); the log-probs then come from
one forward over prompt + answer inside the same generation layout. Neither applies the checkpoint's
own generation_config (repetition penalty, n-gram blocking, ...): PPO samples from the policy, shaped
only by temperature, top_k and top_p.

Backend (stage.ppo.generation.backend): hf, transformers' models, any model, CPU and GPU.
DeepSpeed's hybrid engine (DeepSpeed-Chat's enable_hybrid_engine) is refused with the reason
(pipeline.config.deepspeed_backend_refusal): its inference kernels predate transformers' Cache.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from pipeline.config import GenerationSection, deepspeed_backend_refusal
from pipeline.dist import any_rank, world_size
from pipeline.engine import gathered_params, unwrap
from pipeline.errors import UserError
from pipeline.rl_math import answer_mask, entropy_from_logits, logprobs_of_labels, next_tokens
from pipeline.tracking import progress, progress_enabled


class BackendUnavailable(UserError, RuntimeError):
    """The configured generation backend cannot run; the message names the key to change."""


def check_backend(gen: GenerationSection) -> None:
    """Raise BackendUnavailable (naming stage.ppo.generation.backend) unless the backend can run
    (also for API users who build a RunConfig without load_config)."""
    if gen.backend == "deepspeed":
        raise BackendUnavailable(deepspeed_backend_refusal())
    if gen.backend != "hf":
        raise BackendUnavailable(f"stage.ppo.generation.backend={gen.backend}: must be hf")


def _zero3_offload(engine):
    """DeepSpeed's ZeRO-3 parameter coordinator of a training or inference engine, or None."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None) or optimizer
    return offload if offload is not None and hasattr(offload, "forward_hooks") else None


@contextmanager
def zero3_hooks_off(engine):
    """Take ZeRO-3's per-module fetch/release hooks off for the duration (parameters must be
    gathered by the caller), and put them back afterwards."""
    offload = _zero3_offload(engine)
    if offload is None:
        yield
        return
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    for param in iter_params(offload.module, recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)


def _lora_layers(module) -> list:
    return [m for m in module.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")]


def stop_check_steps(device: torch.device) -> int:
    """Decode steps between checks that every row has ended. Each check makes the host wait for the
    device: on a GPU, every token, the queue of kernels would run dry; on CPU it costs nothing."""
    return 1 if device.type == "cpu" else 8


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left-padded prompts start at 0. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _cache_kwargs(out) -> dict:
    """The KV cache a forward returned, under the keyword the next forward takes it by (transformers 5
    calls it cache, 4.x past_key_values: the output field and the argument share the name)."""
    for key in ("cache", "past_key_values"):
        if out.get(key) is not None:
            return {key: out[key]}
    raise RuntimeError(f"{type(out).__name__} holds no KV cache although use_cache=True was passed")


@dataclass
class Rollout:
    """One call's answers and what the actor made of them as it chose them. B = rows, Lp = prompt
    length, T = answer length (the longest answer of the call); after a row's eos: pad ids and zeros."""

    seq: torch.Tensor  # (B, Lp + T) prompt + answer ids
    logprobs: torch.Tensor  # (B, T) float32 log pi(answer token), pi = softmax of the actor's logits
    entropy: torch.Tensor  # (B, T) float32 entropy of pi at each answer position


class DecodeProgress:
    """A `generate` streamer that advances a transient bar once per decode step (the first `put`
    is the prompt). It copies each step's tokens to the CPU, so it is used only when a bar shows."""

    def __init__(self, max_new_tokens: int):
        self.bar = progress(total=max_new_tokens, desc="[ppo] generating", unit="tok", leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


class RolloutEngine:
    def __init__(self, actor, tokenizer, gen: GenerationSection, merge_lora: bool | None = None,
                 show_progress: bool | None = None):
        """actor: the actor's DeepSpeed engine (or a plain module). merge_lora: fold LoRA adapters
        into the weights while generating (default: stage.ppo.generation.merge_lora, off).
        show_progress: False turns the per-call decode-step bar off; it shows only where progress bars
        do (rank 0 and a terminal, or PIPELINE_PROGRESS=1)."""
        check_backend(gen)
        self.actor, self.tokenizer, self.gen = actor, tokenizer, gen
        self.merge_lora = bool(getattr(gen, "merge_lora", False) if merge_lora is None else merge_lora)
        # A ZeRO-3 actor told not to gather: DeepSpeed's hooks fetch each module at every step.
        zero3 = any(hasattr(p, "ds_id") for p in unwrap(actor).parameters())
        self.per_module = zero3 and getattr(gen, "gather_weights", None) is False
        if self.per_module and self.merge_lora:
            raise ValueError("stage.ppo.generation.merge_lora=true needs the gathered weights: "
                             "not with stage.ppo.generation.gather_weights=false")
        self.show_progress = progress_enabled() and show_progress is not False

    @contextmanager
    def generation_layout(self):
        """Yield the module to call `generate` on, in generation layout; training layout after."""
        module = unwrap(self.actor)
        was_training = module.training
        # The layers' own switches: the model-level enable would add an input-grad hook per call.
        checkpointed = [m for m in module.modules() if getattr(m, "gradient_checkpointing", None) is True]
        lora_layers = _lora_layers(module) if self.merge_lora else []
        module.eval()
        for layer in checkpointed:
            layer.gradient_checkpointing = False
        try:
            with (nullcontext() if self.per_module else gathered_params(module)), \
                    (nullcontext() if self.per_module else zero3_hooks_off(self.actor)):
                # Merging then unmerging is not exact in floating point: keep the originals.
                originals = [layer.base_layer.weight.detach().clone() for layer in lora_layers]
                for layer in lora_layers:
                    layer.merge()
                try:
                    yield module
                finally:
                    with torch.no_grad():
                        for layer, weight in zip(lora_layers, originals):
                            layer.unmerge()
                            layer.base_layer.weight.copy_(weight)
                    del originals
        finally:
            for layer in checkpointed:
                layer.gradient_checkpointing = True
            module.train(was_training)
            if torch.cuda.is_available():  # hand the KV cache back (a full gc costs ~0.1 s per call)
                gc.collect()
                torch.cuda.empty_cache()

    @property
    def logprobs_while_decoding(self) -> bool:
        """The log-probs come from the decoding forwards (else from one more forward: cache=static)."""
        return self.gen.cache != "static"

    def sampling_kwargs(self, do_sample: bool) -> dict:
        """transformers' generate arguments for this section's decoding (greedy when do_sample is false
        or the temperature is 0)."""
        g = self.gen
        do_sample = do_sample and not g.greedy
        # num_beams 1 whatever the checkpoint's generation_config says: PPO scores sampled answers.
        kwargs = {"do_sample": do_sample, "num_beams": 1, "max_new_tokens": g.max_new_tokens, "use_cache": True,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        if g.cache == "static":
            kwargs["cache_implementation"] = "static"
        if do_sample:
            kwargs.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)  # top_k 0 = off
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs  # no min_new_tokens: an answer may end at once (DeepSpeed-Chat forced a minimum)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool | None = None) -> torch.Tensor:
        """Prompts (B, Lp), left-padded -> prompt + answer (B, Lp + T); rows that ended early are padded.
        do_sample: None follows the config (stage.ppo.generation.do_sample, temperature)."""
        return self.rollout(input_ids, attention_mask, do_sample).seq

    @torch.no_grad()
    def rollout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool | None = None) -> Rollout:
        """Answers to left-padded prompts (B, Lp) with the actor's log-probs and entropies (see Rollout)."""
        greedy = self.gen.greedy if do_sample is None else not do_sample or self.gen.greedy
        streamer = DecodeProgress(self.gen.max_new_tokens) if self.show_progress else None
        try:
            with self.generation_layout() as module:
                if self.logprobs_while_decoding:
                    return self._decode(module, input_ids, attention_mask, greedy, streamer)
                seq = module.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                      synced_gpus=self.per_module and world_size() > 1,
                                      **self.sampling_kwargs(not greedy))
                return self._score(module, seq, attention_mask)
        finally:
            if streamer is not None:
                streamer.bar.close()  # also when generation failed (a second close does nothing)

    def _decode(self, module, input_ids: torch.Tensor, attention_mask: torch.Tensor, greedy: bool,
                streamer: DecodeProgress | None) -> Rollout:
        """transformers' decoding loop cut to what PPO uses: KV cache, logits of the last position only,
        rl_math.next_tokens to choose, the call over when every row has produced an eos (seen every
        stop_check_steps; the tokens a row chose after its eos become pad ids, their log-probs 0, and
        steps run after the last eos are cut off)."""
        g, device = self.gen, input_ids.device
        check_every = stop_check_steps(device)
        rows, prompt_len = input_ids.shape
        answer = input_ids.new_empty((rows, g.max_new_tokens))
        logprobs = torch.empty(rows, g.max_new_tokens, device=device)
        entropy = torch.empty_like(logprobs)
        # As transformers does: a batch without padding runs without a mask (the causal kernel).
        mask = None if bool(attention_mask.all()) else torch.cat([attention_mask, attention_mask.new_ones(answer.shape)], 1)
        positions = position_ids(attention_mask)
        # (T, B): row t holds the positions of answer token t, contiguous like every input below (strided
        # views of the ids and positions send the embedding lookups down slower paths).
        answer_positions = positions[:, -1] + torch.arange(1, g.max_new_tokens + 1, device=device)[:, None]
        ended = torch.zeros(rows, dtype=torch.bool, device=device)
        # Per-module ZeRO-3 fetching makes every forward a collective: a rank whose answers have all
        # ended keeps stepping (its tokens unused) until every rank's have, or the others would hang.
        synced = self.per_module and world_size() > 1
        inputs, cache, length, scratch = {"input_ids": input_ids, "position_ids": positions}, {}, None, None
        if streamer is not None:
            streamer.put(input_ids)
        # Inference mode spares each small op its autograd bookkeeping (5% of a step on CPU); not with
        # DeepSpeed fetching parameters inside the forwards, which must stay ordinary tensors.
        with torch.inference_mode(not self.per_module):
            for t in range(g.max_new_tokens):
                step_mask = None if mask is None else mask[:, :prompt_len + t].contiguous()
                out = module(**inputs, attention_mask=step_mask, use_cache=True, logits_to_keep=1, **cache)
                cache = _cache_kwargs(out)
                if length is None:
                    logits = out.logits[:, -1]
                    if scratch is None:
                        scratch = torch.empty(logits.shape, dtype=torch.float32, device=device)
                    chosen, logprobs[:, t], entropy[:, t] = next_tokens(logits, greedy, g.temperature, g.top_k,
                                                                        g.top_p, scratch)
                    answer[:, t] = chosen
                    ended |= chosen == self.tokenizer.eos_token_id
                    if streamer is not None:
                        streamer.put(chosen)
                    if (t + 1) % check_every == 0 and bool(ended.all()):
                        length = t + 1
                if not (any_rank(length is None) if synced else length is None):
                    break
                inputs = {"input_ids": chosen[:, None], "position_ids": answer_positions[t][:, None]}
        if streamer is not None:
            streamer.end()
        kept = answer_mask(answer[:, :length or g.max_new_tokens], self.tokenizer.eos_token_id).bool()
        kept = kept[:, :int(kept.sum(1).max())]  # up to the longest answer, as transformers returns them
        answer = answer[:, :kept.shape[1]].masked_fill(~kept, self.tokenizer.pad_token_id)
        return Rollout(torch.cat([input_ids, answer], 1), logprobs[:, :kept.shape[1]] * kept,
                       entropy[:, :kept.shape[1]] * kept)

    def _score(self, module, seq: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        """Log-probs and entropies of answers generated by transformers' generate: one forward over
        prompt + answer (logits of the answer positions only), in the generation layout."""
        prompt_len = prompt_mask.shape[1]
        answer = seq[:, prompt_len:]
        mask = answer_mask(answer, self.tokenizer.eos_token_id)
        attention = torch.cat([prompt_mask, mask], 1)
        keep = torch.arange(prompt_len - 1, seq.shape[1] - 1, device=seq.device)
        logits = module(input_ids=seq, attention_mask=attention, position_ids=position_ids(attention),
                        use_cache=False, logits_to_keep=keep).logits
        logprobs = logprobs_of_labels(logits, answer) * mask
        # A row at a time: no (B, T, V) float32 copy of the logits.
        entropy = torch.cat([entropy_from_logits(logits[i:i + 1]) for i in range(seq.shape[0])]) * mask
        return Rollout(seq, logprobs, entropy)


"""The rollout ("hybrid") engine: switches the actor from its training layout to a generation
layout for one `generate` call and back.

Generation layout: eval mode (no dropout), KV cache on, gradient checkpointing off, ZeRO-3
parameters gathered once for the whole call (and DeepSpeed's per-module fetch/release hooks
taken off meanwhile, so no token triggers a gather), LoRA adapters merged into the weights when
`merge_lora` is set (and the exact original weights restored afterwards), caches released at
the end. An actor too large to gather on one device (generation.gather_weights=false, which the
planner sets then) keeps DeepSpeed's hooks instead: each module is fetched at every decode step,
slow but within memory, with the ranks stepping together (synced_gpus). On rank 0 in a terminal
a transient bar counts the decode steps of each call.

Backend (stage.ppo.generation.backend): hf, transformers' generate, any model, CPU and GPU.
DeepSpeed's hybrid engine (DeepSpeed-Chat's enable_hybrid_engine) is refused with the reason
(pipeline.config.deepspeed_backend_refusal): its inference kernels predate transformers' Cache.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext

import torch

from pipeline.config import GenerationSection, deepspeed_backend_refusal
from pipeline.dist import world_size
from pipeline.engine import gathered_params, unwrap
from pipeline.errors import UserError
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

    def sampling_kwargs(self, do_sample: bool) -> dict:
        g = self.gen
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

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool = True) -> torch.Tensor:
        """Prompts (B, Lp), left-padded -> prompt + answer (B, Lp + T); rows that ended early are padded."""
        kwargs = self.sampling_kwargs(do_sample)
        streamer = DecodeProgress(self.gen.max_new_tokens) if self.show_progress else None
        try:
            with self.generation_layout() as module:
                # Per-module fetching makes every forward a collective: ranks whose answers all ended
                # keep stepping until every rank's have (synced_gpus), or the others would hang.
                return module.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                                       synced_gpus=self.per_module and world_size() > 1, **kwargs)
        finally:
            if streamer is not None:
                streamer.bar.close()  # also when generate failed (a second close does nothing)


"""The rollout ("hybrid") engine: switches the actor from its training layout to a generation
layout for one `generate` call and back.

Generation layout: eval mode (no dropout), KV cache on, gradient checkpointing off, ZeRO-3
parameters gathered once for the whole call instead of once per token, LoRA adapters merged
into the weights when `merge_lora` is set (and unmerged afterwards). Backends:
  hf        transformers' generate; any model, CPU and GPU (default)
  deepspeed DeepSpeed's hybrid engine; CUDA inference kernels, some model families only
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.config import GenerationSection
from pipeline.engine import gathered_params, unwrap


class RolloutEngine:
    def __init__(self, actor, tokenizer, gen: GenerationSection, merge_lora: bool = False):
        if gen.backend == "deepspeed" and not torch.cuda.is_available():
            raise RuntimeError("stage.ppo.generation.backend=deepspeed needs CUDA; use backend=hf")
        self.actor, self.tokenizer, self.gen, self.merge_lora = actor, tokenizer, gen, merge_lora

    @contextmanager
    def generation_layout(self):
        module = unwrap(self.actor)
        was_training = module.training
        checkpointing = bool(getattr(module, "is_gradient_checkpointing", False))
        merged = self.merge_lora and hasattr(module, "merge_adapter")
        module.eval()
        if checkpointing:
            module.gradient_checkpointing_disable()
        try:
            with gathered_params(module):
                if merged:
                    module.merge_adapter()
                try:
                    yield module
                finally:
                    if merged:
                        module.unmerge_adapter()
        finally:
            if checkpointing:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            module.train(was_training)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, do_sample: bool = True) -> torch.Tensor:
        """Prompts (B, Lp), left-padded -> prompt + answer (B, Lp + T); rows that ended early are padded."""
        g = self.gen
        with self.generation_layout() as module:
            return module.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=do_sample,
                temperature=g.temperature if do_sample else None, top_p=g.top_p if do_sample else None,
                top_k=g.top_k if do_sample else None, max_new_tokens=g.max_new_tokens,  # top_k 0 = off
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
            )

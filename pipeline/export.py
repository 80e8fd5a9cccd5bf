"""Final models in Hugging Face format: written whole by rank 0, gathered one module at a time.

Under ZeRO-3 no device ever holds a model whole for the save: each module's parameters are
gathered, copied into rank 0's host RAM and released before the next. Under tensor parallelism
(DeepSpeed AutoTP) each split layer's shards are gathered the same way, one module at a time (inside
the ZeRO-3 gather when both apply), so the files are those of the unsplit model, and equal to what a
run without TP writes from the same weights. LoRA layers are written merged (base weight + peft's own
get_delta_weight), keyed as the model without LoRA; an override (the EMA's averages) can stand in
for any trained parameter.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from pipeline.dist import rank
from pipeline.engine import gathered_params, unwrap


def save_hf(model: nn.Module, path, tokenizer, override=None) -> None:
    """Write a trained model in Hugging Face format (safetensors), LoRA merged. `override(param)`,
    called on every rank in the same order (it may be collective), gives a parameter's whole value
    on rank 0 to write instead (the EMA's), or None. Collective. Under ZeRO-3 the weights are
    gathered one module at a time and only rank 0 keeps a copy: no device ever holds the model
    whole, and rank 0's host RAM holds it once (bytes per parameter x P)."""
    module = unwrap(model)
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft: the wrapped model
    state = whole_state_dict(base, override or (lambda param: None))
    if rank() == 0:
        # The config's pad id is that of the tokenizer saved beside it: transformers' sequence-classifier
        # pooling finds the last real token by it (a DeepSpeed-Chat OPT config says eos).
        base.config.pad_token_id = tokenizer.pad_token_id
        base.save_pretrained(Path(path), state_dict=state)
        tokenizer.save_pretrained(Path(path))


def _check_mergeable(model: nn.Module) -> None:
    """Refuse (on every rank, before any gather) the peft layouts whole_state_dict does not merge."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    for name, sub in model.named_modules():
        if isinstance(sub, ModulesToSaveWrapper):
            raise ValueError(f"{name}: peft modules_to_save wrappers are not written by save_hf")
        if isinstance(sub, LoraLayer):
            why = ("a LoRA variant (DoRA, ...)" if getattr(sub, "lora_variant", None) else
                   "lora_bias" if any(getattr(sub, "lora_bias", {}).values()) else
                   "adapters merged into it" if sub.merged else
                   "a base layer without a weight" if not hasattr(sub.get_base_layer(), "weight") else None)
            if why:
                raise ValueError(f"{name}: cannot write a LoRA layer with {why}; only plain LoRA is merged on save")


@torch.no_grad()
def whole_state_dict(model: nn.Module, override) -> dict[str, torch.Tensor] | None:
    """On rank 0, `model`'s weights whole on the CPU, keyed as the model without LoRA would be: each
    peft LoRA layer's weight comes merged (base + peft's own get_delta_weight). None on other ranks.
    Collective: every rank walks the modules in the same order, gathering each one's parameters;
    `override` as in save_hf."""
    from peft.tuners.lora import LoraLayer

    _check_mergeable(model)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # tied weights are written once
    lora_prefixes: list[str] = []
    for name, sub in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in lora_prefixes):
            continue  # inside a LoRA layer: written merged below
        key = f"{name}." if name else ""
        if isinstance(sub, LoraLayer):
            lora_prefixes.append(name)
            params = list(sub.parameters())
            values = _override_values(params, override)
            base = sub.get_base_layer()
            adapters = [a for a in sub.active_adapters if a in sub.lora_A or a in getattr(sub, "lora_embedding_A", {})]
            with gathered_params(model, params):
                if rank() == 0:
                    with _overridden(params, values):
                        merged = base.weight.detach().to(torch.float32, copy=True)  # never the weight itself
                        for adapter in adapters:
                            merged += sub.get_delta_weight(adapter).float()
                        state[key + "weight"] = merged.to(base.weight.dtype).cpu()
                        if getattr(base, "bias", None) is not None:
                            state[key + "bias"] = base.bias.detach().cpu().clone()
            seen.update(id(p) for p in params)
            continue
        own = [(pname, p) for pname, p in sub.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        values = _override_values([p for _, p in own], override)
        split = _tensor_parallel_layer(sub)
        with gathered_params(model, list(sub.parameters(recurse=False)) if split else [p for _, p in own]), \
                _shards_gathered(sub) if split else nullcontext():
            if rank() == 0:
                for pname, p in own:
                    state[key + pname] = values.get(id(p), p).detach().to("cpu", p.dtype, copy=True)
        if rank() == 0:
            for bname, buffer in sub.named_buffers(recurse=False):
                if bname not in sub._non_persistent_buffers_set:
                    state[key + bname] = buffer.detach().cpu().clone()
    return state if rank() == 0 else None


def _tensor_parallel_layer(module: nn.Module) -> bool:
    """Whether DeepSpeed AutoTP replaced `module` with a layer holding one shard per rank."""
    from deepspeed.module_inject.layers import TensorParallel_Layer

    return isinstance(module, TensorParallel_Layer)


def _shards_gathered(module: nn.Module):
    """The whole weights of an AutoTP layer for the duration, on every rank of its tensor-parallel
    group (one all-gather); each rank keeps its own shard again afterwards. Needs its parameters
    whole first under ZeRO-3 (gathered_params around it)."""
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    return GatherReplacedLayerParams(list(module.parameters(recurse=False)), module, enabled=True)


def _override_values(params: list, override) -> dict[int, torch.Tensor]:
    """id(param) -> override value, for the parameters that have one (called on every rank)."""
    values = {}
    for p in params:
        value = override(p)
        if value is not None:
            values[id(p)] = value
    return values


@contextmanager
def _overridden(params: list, overrides: dict[int, torch.Tensor]):
    """Parameters temporarily holding their override values (whole, gathered), then their own."""
    own = {id(p): p.detach().clone() for p in params if id(p) in overrides}
    try:
        for p in params:
            if id(p) in overrides:
                p.data.copy_(overrides[id(p)])
        yield
    finally:
        for p in params:
            if id(p) in own:
                p.data.copy_(own[id(p)])

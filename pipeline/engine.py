"""DeepSpeed set-up shared by the stages: process group, LoRA, optimizer, scheduler, engine."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from pipeline.config import LoRASection, OptimSection, RunConfig, StrategySection

NO_DECAY = ("bias", "layer_norm", "layernorm", "norm.weight", "ln_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig) -> None:
    """Join (or, alone, create) the process group: gloo on CPU, nccl on CUDA."""
    if device_type(cfg) == "cpu":  # spares DeepSpeed's accelerator probe and its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    backend = "nccl" if device_type(cfg) == "cuda" else "gloo"
    if "RANK" not in os.environ:
        # Alone: a private one-process group. Nothing goes into os.environ, so processes this one
        # starts (tests, sweeps, launchers) do not inherit a port it holds.
        port = cfg.deployment.master_port or free_port()
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it; harmless to inherit
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts an existing group
    if device_type(cfg) == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def device_type(cfg: RunConfig) -> str:
    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() and cfg.hardware.device == "cuda" else "cpu"
    return cfg.run.device


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def collective_device() -> torch.device:
    """Where the small tensors of a collective (flags, metric sums) must live: NCCL reduces CUDA
    tensors only, gloo CPU ones."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_lora(model: nn.Module, lora: LoRASection) -> nn.Module:
    """Wrap `model` with peft LoRA adapters (dim > 0); the base stays trainable unless only_optimize_lora."""
    if not lora.dim:
        return model
    from peft import LoraConfig, get_peft_model

    base_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    peft_model = get_peft_model(model, LoraConfig(
        r=lora.dim, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)))
    # Adapters in the base's dtype: peft makes them fp32, and DeepSpeed casts a plain model's
    # parameters to bf16/fp16 itself but not those of a model built under zero.Init, where fp32
    # adapters would mix dtypes in ZeRO-3's flat buffers.
    for param in peft_model.parameters():
        if param.is_floating_point() and param.dtype != base_dtype:
            param.data = param.data.to(base_dtype)
    if not lora.only_optimize_lora:
        for name, param in peft_model.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(True)
    return peft_model


def param_groups(model: nn.Module, optim: OptimSection, lora: LoRASection) -> list[dict]:
    """No weight decay on biases and norms (as DeepSpeed-Chat); LoRA weights at their own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = ("lora_" in name, not any(tag in name.lower() for tag in NO_DECAY))
        groups.setdefault(key, []).append(param)
    out = []
    for (is_lora, decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": optim.weight_decay if decay else 0.0,
                    "lr": lora.learning_rate if is_lora else optim.learning_rate})
    return out


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, non-reentrant. transformers >= 5.2x calls it
    activation_checkpointing_* (the gradient_checkpointing_* names warn); older versions only
    have the old names."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (either transformers naming)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        try:
            return bool(getattr(model, name))
        except AttributeError:
            continue
    return False


def ds_config(cfg: RunConfig, micro_batch: int, grad_accum: int, strategy: StrategySection,
              optim: OptimSection | None) -> dict:
    """DeepSpeed's config for one engine."""
    dtype = cfg.dtype
    zero: dict = {"stage": strategy.zero_stage or 0}
    if strategy.offload and zero["stage"] >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero["stage"] == 3:
            zero["offload_param"] = {"device": "cpu"}
    if zero["stage"] == 3:
        # No prefetch: each module's weights are gathered when it runs and released after (no
        # prefetch races in generation-time forwards, and a known footprint for the planner).
        zero.update({"stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 1e4})
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size(),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optim is not None and optim.gradient_clipping > 0:
        config["gradient_clipping"] = optim.gradient_clipping
    return config


class OffloadUnavailable(RuntimeError):
    """CPU offload was asked for but cannot run here; the message names the key."""


def make_optimizer(cfg: RunConfig, model: nn.Module, optim: OptimSection, lora: LoRASection, strategy: StrategySection,
                   key: str = "strategy"):
    """AdamW: torch's fused single-kernel update on CUDA (DeepSpeed's FusedAdam does the same but
    JIT-builds a CUDA op with nvcc on first use); DeepSpeedCPUAdam with offload (a C++ op JIT-built
    on first use, cached under ~/.cache/torch_extensions; needs a C++ compiler and the Python headers)."""
    groups = param_groups(model, optim, lora)
    betas = tuple(optim.betas)
    if strategy.offload:
        if (strategy.zero_stage or 0) < 1:
            raise OffloadUnavailable(f"{key}.offload=true needs {key}.zero_stage >= 1 (ZeRO offloads the optimizer "
                                     f"state it partitions); set {key}.zero_stage=1, 2 or 3, or {key}.offload=false")
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=optim.learning_rate, betas=betas)
        except Exception as err:  # the op build failed: no compiler, headers, or an unsupported CPU
            raise OffloadUnavailable(
                f"{key}.offload=true: DeepSpeed's CPU Adam op could not be built or loaded here "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it needs a C++ compiler and "
                f"Python headers (check `ds_report`), or set {key}.offload=false") from err
    return torch.optim.AdamW(groups, lr=optim.learning_rate, betas=betas, fused=device_type(cfg) == "cuda")


def initialize(
    cfg: RunConfig,
    model: nn.Module,
    *,
    micro_batch: int,
    grad_accum: int,
    optim: OptimSection,
    lora: LoRASection,
    strategy: StrategySection,
    total_steps: int,
    key: str = "strategy",
):
    """A DeepSpeed engine training `model` (LoRA and gradient checkpointing applied here).

    key: the config prefix of `strategy` for error messages (e.g. "stage.ppo.actor_strategy")."""
    import deepspeed
    from transformers import get_scheduler

    model = apply_lora(model, lora)
    if strategy.gradient_checkpointing:
        set_activation_checkpointing(model, True)
        if lora.dim and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = make_optimizer(cfg, model, optim, lora, strategy, key)
    scheduler = get_scheduler(optim.lr_scheduler_type, optimizer, num_warmup_steps=min(optim.num_warmup_steps, total_steps),
                              num_training_steps=max(total_steps, 1))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(cfg, micro_batch, grad_accum, strategy, optim),
    )
    if world_size() == 1 and not strategy.zero_stage:
        # One rank, no ZeRO: nothing to reduce, yet DeepSpeed would flatten, all-reduce and copy back every gradient.
        engine.enable_backward_allreduce = False
    return engine


@contextmanager
def zero3_construction(cfg: RunConfig, strategy: StrategySection):
    """Around building a model for `strategy`: with ZeRO-3, transformers builds it under
    deepspeed.zero.Init and loads each weight straight into this rank's partition (in host RAM with
    offload). Without it the model would sit whole on one device for a moment: DeepSpeed moves a
    model to the device before partitioning it, which no planned layout leaves room for. Needs
    init_distributed first (zero.Init partitions over the process group)."""
    if (strategy.zero_stage or 0) < 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(ds_config(cfg, 1, 1, strategy, None))  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


def inference_engine(cfg: RunConfig, build, partner: StrategySection, offload: bool):
    """A frozen model from `build()`. With `offload`, a ZeRO-3 inference engine whose weights stay in
    host RAM and reach the device a module at a time during each forward; else sharded by ZeRO-3
    like its trained `partner` when that runs ZeRO-3, or a plain module on the device."""
    if not offload and (partner.zero_stage or 0) < 3:
        return build().eval().requires_grad_(False).to(device_type(cfg))
    import deepspeed

    layout = StrategySection(zero_stage=3, offload=offload)
    with zero3_construction(cfg, layout):
        model = build().eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(cfg, 1, 1, layout, None))
    return engine


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DeepSpeed engine (and peft wrapper, if any)."""
    return getattr(model, "module", model)


@contextmanager
def gathered_params(model: nn.Module, params: list | None = None, modifier_rank: int | None = None):
    """Full parameters of a ZeRO-3 model (or just `params`) for the duration: one gather, not one
    per forward. With modifier_rank, that rank's in-place changes are kept (scattered back)."""
    params = [p for p in (model.parameters() if params is None else params) if hasattr(p, "ds_id")]
    if not params:
        with nullcontext():
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


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
        with gathered_params(model, [p for _, p in own]):
            if rank() == 0:
                for pname, p in own:
                    state[key + pname] = values.get(id(p), p).detach().to("cpu", p.dtype, copy=True)
        if rank() == 0:
            for bname, buffer in sub.named_buffers(recurse=False):
                if bname not in sub._non_persistent_buffers_set:
                    state[key + bname] = buffer.detach().cpu().clone()
    return state if rank() == 0 else None


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

"""DeepSpeed set-up shared by the stages: process group, LoRA, optimizer, scheduler, engine."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from pipeline.config import LoRASection, OptimSection, RoleSection, RunConfig, StrategySection
from pipeline.dist import device_type, world_size
from pipeline.errors import UserError

NO_DECAY = ("bias", "layer_norm", "layernorm", "norm.weight", "ln_")


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
    if optim is not None:  # always written: DeepSpeed clips at 1.0 when the key is absent
        config["gradient_clipping"] = optim.gradient_clipping
    return config


class OffloadUnavailable(UserError, RuntimeError):
    """CPU offload was asked for but cannot run here; the message names the key."""


def make_optimizer(cfg: RunConfig, model: nn.Module, role: RoleSection, key: str):
    """AdamW: torch's fused single-kernel update on CUDA (DeepSpeed's FusedAdam does the same but
    JIT-builds a CUDA op with nvcc on first use); DeepSpeedCPUAdam with offload (a C++ op JIT-built
    on first use, cached under ~/.cache/torch_extensions; needs a C++ compiler and the Python headers).
    key: the config key of `role` for error messages (e.g. "stage.ppo.actor")."""
    optim, strategy = role.optim, role.strategy
    groups = param_groups(model, optim, role.lora)
    betas = tuple(optim.betas)
    key = f"{key}.strategy"
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


def initialize(cfg: RunConfig, model: nn.Module, role: RoleSection, key: str, *, micro_batch: int, grad_accum: int,
               total_steps: int):
    """A DeepSpeed engine training `model` as `role` says (optimizer, LoRA, layout; LoRA and gradient
    checkpointing are applied here). key: the config key of `role` (e.g. "stage.ppo.actor"), for errors."""
    import deepspeed
    from transformers import get_scheduler

    optim, strategy = role.optim, role.strategy
    model = apply_lora(model, role.lora)
    if strategy.gradient_checkpointing:
        set_activation_checkpointing(model, True)
        if role.lora.dim and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = make_optimizer(cfg, model, role, key)
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
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        unset_hf_deepspeed_config,
    )

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

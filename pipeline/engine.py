"""DeepSpeed set-up shared by the stages: process group, LoRA, optimizer, scheduler, engine.

Tensor parallelism (strategy.tp_degree > 1) is DeepSpeed's AutoTP: `deepspeed.initialize` splits
every attention and MLP Linear of a Hugging Face model over tp consecutive ranks, in place (the
Parameters the optimizer holds stay valid); embeddings, LayerNorms, row-parallel biases and a tied LM
head stay whole. DeepSpeed keeps one tensor- and data-parallel group per process, built by the first
engine with tensor_parallel and used by every later engine: the models of one stage share a degree,
and between stages the groups are released (`claim_tensor_parallel`) so that the next stage can use
another (measured: TP 2 -> 4 -> 1 in one process, each stage's losses equal to a fresh process's).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from pipeline.config import (
    TRAINED_ROLES,
    ConfigError,
    LoRASection,
    OptimSection,
    RoleSection,
    RunConfig,
    StrategySection,
    at,
    tensor_parallel_refusal,
)
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


def tp_degree(strategy: StrategySection) -> int:
    """The tensor-parallel degree of a layout (null, before the plan fills it: 1)."""
    return strategy.tp_degree or 1


def ds_config(cfg: RunConfig, micro_batch: int, grad_accum: int, strategy: StrategySection,
              optim: OptimSection | None) -> dict:
    """DeepSpeed's config for one engine. With tensor parallelism train_batch_size still counts every
    rank (micro x accumulation x world): DeepSpeed checks it before its tensor-parallel groups exist,
    against the whole world; the gradients are averaged over the data-parallel group all the same."""
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
    if tp_degree(strategy) > 1:
        # A tied head left vocabulary-parallel (DeepSpeed's default on the HF-plan path, LLaMA with
        # tie_word_embeddings) returns each rank's V / tp slice of the logits: wrong tokens and log-probs.
        config["tensor_parallel"] = {"autotp_size": tp_degree(strategy), "vocab_parallel_lm_head": False}
    return config


# The tensor-parallel degree of DeepSpeed's process-wide groups (1: none built) and the stage of the
# run that built them: (id of its RunConfig, stage name).
_TP_GROUPS: dict = {"degree": 1, "owner": None}
# deepspeed.utils.groups' module state that its first tensor-parallel engine sets (0.19.x).
_DEEPSPEED_TP_STATE = ("_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                       "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK", "mpu")


def claim_tensor_parallel(cfg: RunConfig, stage: str | None, tp: int, key: str) -> None:
    """Before an engine of degree `tp` for `stage` is built: DeepSpeed's groups of another degree
    are released when an earlier stage built them (its engines are done), refused with the reason
    when this stage did (an engine of another degree would silently use them, or fail). stage None
    (an engine for no known role): as the stage that holds the groups."""
    held = _TP_GROUPS
    owner = (id(cfg), stage) if stage else held["owner"]
    if tp == held["degree"] == 1:
        return
    if tp == held["degree"] or held["degree"] == 1:  # the same groups, or the first to build them
        held.update(degree=tp, owner=owner)
        return
    if held["owner"] == owner:
        raise ConfigError(f"{key}.strategy.tp_degree={tp}: another model of stage {owner[1]} runs with tensor-parallel "
                          f"degree {held['degree']}, and DeepSpeed keeps one tensor-parallel group per process (a "
                          f"later engine's degree is ignored; one without it fails); give the models of a stage one degree")
    from deepspeed.utils import groups

    missing = [name for name in _DEEPSPEED_TP_STATE if not hasattr(groups, name)]
    if missing:
        raise ConfigError(f"{key}.strategy.tp_degree={tp}: an earlier stage of this process ran with tensor-parallel "
                          f"degree {held['degree']}, and this DeepSpeed keeps its groups where they cannot be released "
                          f"({', '.join(missing)} not found); run the stages of each degree in their own command (run.stages)")
    for name in _DEEPSPEED_TP_STATE:
        setattr(groups, name, None)
    held.update(degree=tp, owner=owner if tp > 1 else None)


def _stage_of(cfg: RunConfig, strategy: StrategySection) -> tuple[str | None, str]:
    """(stage, config key) of the trained role whose layout `strategy` is; (None, "strategy") for a
    layout of no role (API users may pass their own)."""
    return next(((stage, key) for stage, _, key in TRAINED_ROLES if at(cfg, key).strategy is strategy),
                (None, "strategy"))


def check_head_split(model: nn.Module, tp: int, key: str) -> None:
    """Refuse (ConfigError naming `key`) a tensor-parallel degree the loaded model's heads do not allow,
    for models the config could not size before loading (hub ids without a cached config.json)."""
    config = getattr(unwrap(model), "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if tp > 1 and heads:
        why = tensor_parallel_refusal(key, tp, getattr(config, "_name_or_path", "") or type(model).__name__, heads,
                                      getattr(config, "num_key_value_heads", None))
        if why:
            raise ConfigError(why)


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
    tp = tp_degree(strategy)
    if tp > 1 and role.lora.dim:
        raise ConfigError(f"{key}.lora.dim={role.lora.dim} with {key}.strategy.tp_degree={tp}: DeepSpeed AutoTP cannot "
                          f"shard peft LoRA layers (it splits the adapters or drops them); set lora.dim=0 or tp_degree=1")
    check_head_split(model, tp, key)
    claim_tensor_parallel(cfg, key.split(".")[1] if key.startswith("stage.") else None, tp, key)
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
    if world_size() // tp == 1 and not strategy.zero_stage:
        # One data-parallel replica (one rank, or one tensor-parallel group), no ZeRO: nothing to reduce, yet
        # DeepSpeed would flatten every gradient into a bucket as large (measured at TP=2 on 2 ranks: the step's
        # peak, with gradient checkpointing), all-reduce it over a group of one and copy it back.
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

    # transformers refuses a config with tensor_parallel (it would convert the weights for TP itself):
    # zero.Init partitions the whole weights, and deepspeed.initialize splits them afterwards.
    config = {k: v for k, v in ds_config(cfg, 1, 1, strategy, None).items() if k != "tensor_parallel"}
    config = HfDeepSpeedConfig(config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


def inference_engine(cfg: RunConfig, build, partner: StrategySection, offload: bool):
    """A frozen model from `build()`. With `offload`, a ZeRO-3 inference engine whose weights stay in
    host RAM and reach the device a module at a time during each forward; else sharded by ZeRO-3
    like its trained `partner` when that runs ZeRO-3, or a plain module on the device. Split over the
    partner's tensor-parallel degree like the partner (an inference engine then, ZeRO-0 or ZeRO-3)."""
    tp = tp_degree(partner)
    if not offload and (partner.zero_stage or 0) < 3 and tp == 1:
        return build().eval().requires_grad_(False).to(device_type(cfg))
    import deepspeed

    stage, key = _stage_of(cfg, partner)
    layout = StrategySection(zero_stage=3 if offload or (partner.zero_stage or 0) >= 3 else 0, offload=offload,
                             tp_degree=tp)
    with zero3_construction(cfg, layout):
        model = build().eval().requires_grad_(False)
    check_head_split(model, tp, key)
    claim_tensor_parallel(cfg, stage, tp, key)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(cfg, 1, 1, layout, None))
    return engine


def engine_tp_degree(model) -> int:
    """The tensor-parallel degree a DeepSpeed engine was split with; 1 for anything else."""
    size = getattr(model, "autotp_size", None)
    return max(1, int(size())) if callable(size) else 1


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

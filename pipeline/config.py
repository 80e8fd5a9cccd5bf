"""The one typed config: Hydra composes YAML, `load_config` merges it into these
dataclasses once and validates it; every other module reads `RunConfig`.

Errors name the override key, e.g.
    stage.ppo.per_device_training_batch_size=7 must divide ... (got 7)
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.catalog import UnknownModelError, model_source, resolve_model
from pipeline.data_schema import DataBlendSection, validate_data_blend
from pipeline.errors import UserError

STAGES = ("sft", "rm", "ppo")
DTYPES = ("fp32", "bf16", "fp16")


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key to fix."""


def deepspeed_backend_refusal() -> str:
    """Why stage.ppo.generation.backend=deepspeed (DeepSpeed-Chat's enable_hybrid_engine) cannot run."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "(not installed)"

    return (f"stage.ppo.generation.backend=deepspeed cannot run with transformers {installed('transformers')}: "
            f"DeepSpeed {installed('deepspeed')}'s hybrid engine swaps decoder layers for inference kernels that "
            "keep the old tuple KV cache, while transformers >= 4.50 hands every layer a Cache object; DeepSpeed "
            "skips OPT for this reason (no speed-up) and the other families fail inside generate. "
            "Use stage.ppo.generation.backend=hf (ZeRO-3 weights are gathered once per generate call, not per token)")


# --------------------------------------------------------------------------- run


@dataclass
class RunSection:
    # Folder name under outputs/ when output_dir is not given.
    name: str = "default"
    # Where the run lives; each stage writes <output_dir>/<stage>/.
    output_dir: Optional[str] = None
    # Subset of stages to run, in order (DeepSpeed-Chat's --step).
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 1234
    # auto: continue from the last checkpoint; never: start over; or a checkpoint path.
    resume: str = "auto"
    # Print the plan and exit without loading weights.
    dry_run: bool = False
    # fp32 | bf16 | fp16; null lets the hardware profile decide.
    dtype: Optional[str] = None
    # cpu | cuda | auto
    device: str = "auto"
    # Loggers besides metrics.jsonl: any of wandb, tensorboard.
    loggers: list[str] = field(default_factory=list)
    # Print a progress/metrics line every N optimizer steps.
    log_interval: int = 10


# --------------------------------------------------------------------------- model


@dataclass
class ModelSection:
    # Catalog alias (opt-1.3b, llama-2-7b, tiny-opt), hub id, or local folder.
    actor: str = "opt-1.3b"
    # The reward model / critic base for step 2 (DeepSpeed-Chat's --reward-model).
    reward: str = "opt-350m"
    # Tokenizer folder or hub id; null = the actor's; "builtin" = the offline demo tokenizer.
    tokenizer: Optional[str] = None
    # Resolved sources (hub id / absolute path / builtin:<name>); filled by interpolation.
    actor_source: str = "${model_source:${model.actor}}"
    reward_source: str = "${model_source:${model.reward}}"
    # Only when the user says so: remote code runs arbitrary Python from the hub.
    trust_remote_code: bool = False
    # Dropout in every trained model; null keeps the model's own (DeepSpeed-Chat turns it off).
    dropout: Optional[float] = 0.0


# --------------------------------------------------------------------------- stages


@dataclass
class LoRASection:
    # 0 = off; null = the planner decides. DeepSpeed-Chat presets use 128 on decoder layers.
    dim: Optional[int] = None
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    learning_rate: float = 5e-4
    # Train the adapters only (peft's way, what the planner assumes); false also trains the base
    # weights, as DeepSpeed-Chat does by default.
    only_optimize_lora: bool = True


@dataclass
class OptimSection:
    learning_rate: float = 9.65e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 0
    gradient_clipping: float = 1.0


@dataclass
class StrategySection:
    """How a model is laid out; null fields are chosen by the planner."""

    zero_stage: Optional[int] = None
    # Offload optimizer states (ZeRO >= 1) and, with ZeRO-3, parameters to CPU memory.
    offload: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = None


@dataclass
class CheckpointSection:
    # Save a full resumable checkpoint every N optimizer steps (0 = off) ...
    every_steps: int = 0
    # ... and/or every M minutes of training (0 = off): a long run loses at most this much.
    every_minutes: float = 30.0
    # Complete checkpoints kept; older ones are pruned.
    keep: int = 2


@dataclass
class SFTSection:
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    # Cap on optimizer steps (null = the epochs decide).
    max_steps: Optional[int] = None
    # Leave prompt tokens out of the loss (DeepSpeed-Chat keeps them in).
    mask_prompt: bool = False
    eval_interval: int = 0  # 0 = at the end of each epoch only
    optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=9.65e-6))
    lora: LoRASection = field(default_factory=LoRASection)
    strategy: StrategySection = field(default_factory=StrategySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class RMSection:
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    max_steps: Optional[int] = None
    eval_interval: int = 0
    optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=5e-5, weight_decay=0.1))
    lora: LoRASection = field(default_factory=LoRASection)
    strategy: StrategySection = field(default_factory=StrategySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class GenerationSection:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # hf: transformers' generate on the rollout engine (any model, CPU and GPU). deepspeed (DeepSpeed's
    # hybrid engine) is refused with the reason: see deepspeed_backend_refusal().
    backend: str = "hf"
    # Fold LoRA adapters into the actor's weights while generating (exact originals restored after).
    merge_lora: bool = False
    # KV cache: dynamic (grows per token) or static (preallocated for prompt + max_new_tokens; on
    # CUDA transformers then compiles the decode step, which removes most per-token Python overhead).
    cache: str = "dynamic"
    # ZeRO-3 actor: gather its whole weights once per generate call (fast; each device then holds the
    # model whole for the call), or leave DeepSpeed to fetch each module at every decode step (slow;
    # for actors no single device can hold). null = the planner decides (gathered when it fits).
    gather_weights: Optional[bool] = None


@dataclass
class PPOSection:
    per_device_generation_batch_size: int = 16
    per_device_training_batch_size: int = 16
    generation_batches: int = 1
    ppo_epochs: int = 1
    num_train_epochs: int = 1
    max_steps: Optional[int] = None
    # DeepSpeed-Chat's hard-coded numbers, same defaults.
    kl_ctl: float = 0.1
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    # Adaptive KL controller: target KL per sequence (null = fixed kl_ctl) and horizon in samples.
    kl_target: Optional[float] = None
    kl_horizon: int = 10000
    whiten_advantages: bool = False
    normalize_reward: bool = False
    # EMA of the actor (DeepSpeed-Chat's --enable_ema), kept in fp32 so that small updates are not
    # rounded away in bf16/fp16; saved as ppo/final/actor_ema.
    enable_ema: bool = False
    ema_beta: float = 0.992
    # Frozen reference and reward models (DeepSpeed-Chat's --offload_reference_model): weights kept in
    # host RAM and streamed to the device a module at a time for each forward (a ZeRO-3 inference
    # engine with parameter offload), whatever the actor's and critic's layout. With the reference
    # model the EMA lives in host RAM too. null = the planner decides: on when step 3 fits only so (or
    # in the smallest layout it reports when nothing fits); for a model it cannot size, and for API
    # use without the planner, as the partner: on under ZeRO-3 + offload (offloads_frozen).
    offload_reference_model: Optional[bool] = None
    offload_reward_model: Optional[bool] = None
    # Weight of the pretraining (PTX) loss; used when data_blend.ptx_path is set.
    unsup_coef: float = 27.8
    generation: GenerationSection = field(default_factory=GenerationSection)
    actor_optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=9.65e-6, num_warmup_steps=100))
    critic_optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=5e-6, num_warmup_steps=100))
    actor_lora: LoRASection = field(default_factory=LoRASection)
    critic_lora: LoRASection = field(default_factory=LoRASection)
    actor_strategy: StrategySection = field(default_factory=StrategySection)
    critic_strategy: StrategySection = field(default_factory=StrategySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def offloads_frozen(self, role: str) -> bool:
        """Whether the frozen `ref` or `reward` model keeps its weights in host RAM: its switch, or
        when that is null (a config the planner never saw) as its partner does under ZeRO-3 + offload."""
        switch, partner = {"ref": (self.offload_reference_model, self.actor_strategy),
                           "reward": (self.offload_reward_model, self.critic_strategy)}[role]
        if switch is not None:
            return switch
        return bool(partner.offload and (partner.zero_stage or 0) >= 3)


@dataclass
class StageSection:
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    ppo: PPOSection = field(default_factory=PPOSection)


# --------------------------------------------------------------------------- hardware / deployment


@dataclass
class HardwareSection:
    """Facts about one device, not strategy."""

    name: str = "cpu"
    # cpu | cuda
    device: str = "cpu"
    # Memory of one device in GiB (for cpu: the RAM given to the job).
    memory_gib: float = 16.0
    bf16: bool = False
    fp16: bool = False
    # Dense bf16 (or fp32 on cpu) peak, TFLOP/s, and memory bandwidth, GB/s.
    peak_tflops: float = 0.5
    bandwidth_gbps: float = 20.0
    # Devices per node (GPUs; processes for cpu).
    devices_per_node: int = 1
    # Host RAM per node in GiB (the budget for CPU offload); null = assume 3x the node's GPU memory.
    host_memory_gib: Optional[float] = None


@dataclass
class DeploymentSection:
    name: str = "local"
    # in_process | torchrun | deepspeed | slurm
    launcher: str = "in_process"
    nodes: int = 1
    # Processes per node; null = every local GPU (or 1 on cpu).
    procs_per_node: Optional[int] = None
    hostfile: Optional[str] = None
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data_blend: DataBlendSection = field(default_factory=DataBlendSection)
    stage: StageSection = field(default_factory=StageSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)
    deployment: DeploymentSection = field(default_factory=DeploymentSection)

    # ---- derived values (one place) ----
    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or Path("outputs") / self.run.name)

    def stage_dir(self, stage: str) -> Path:
        return self.output_dir / stage

    @property
    def world_size(self) -> int:
        if self.deployment.launcher == "in_process":
            return 1
        per_node = self.deployment.procs_per_node or self.hardware.devices_per_node
        return self.deployment.nodes * per_node

    @property
    def dtype(self) -> str:
        if self.run.dtype:
            return self.run.dtype
        if self.hardware.device == "cuda":
            if self.hardware.bf16:
                return "bf16"
            if self.hardware.fp16:
                return "fp16"
        return "fp32"

    @property
    def tokenizer_source(self) -> str:
        return self.model.tokenizer or self.model.actor_source

    def section_hash(self, *keys: str, exclude: tuple[str, ...] = ()) -> str:
        """Stable hash of the named dotted sections (what shapes a stage's result), less `exclude`."""
        plain = OmegaConf.to_container(OmegaConf.structured(self), resolve=True)
        for key in exclude:
            *parents, leaf = key.split(".")
            node: Any = plain
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        picked = {}
        for key in keys:
            node = plain
            for part in key.split("."):
                node = node[part]
            picked[key] = node
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading + validation


def register_resolvers() -> None:
    """The `model_source` resolver and the schema node that conf/config.yaml builds on."""
    if not OmegaConf.has_resolver("model_source"):
        OmegaConf.register_new_resolver("model_source", model_source)
        OmegaConf.register_new_resolver("run_dir", lambda output_dir, name: output_dir or f"outputs/{name}")
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_config_schema", node=RunConfig)


def _key_of(err: OmegaConfBaseException) -> str:
    full = getattr(err, "full_key", None)
    return str(full) if full else "?"


def load_config(cfg: DictConfig | dict) -> RunConfig:
    """Merge a composed Hydra config into the schema and validate it; raise ConfigError."""
    register_resolvers()
    schema = OmegaConf.structured(RunConfig)
    user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    user = OmegaConf.masked_copy(user, [k for k in user.keys() if k != "hydra"]) if "hydra" in user else user
    user = _without_removed_keys(user)
    try:
        merged = OmegaConf.merge(schema, user)
        OmegaConf.resolve(merged)
        run_cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as err:
        raise ConfigError(f"unknown config key {_key_of(err)!r}: {err.msg.splitlines()[0]}") from None
    except ValidationError as err:
        raise ConfigError(f"{_key_of(err)}: {err.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_key_of(err)}: {str(err).splitlines()[0]}") from None
    validate(run_cfg)
    return run_cfg


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The typed config of a run folder (its config.yaml, written by the runner with the plan's
    choices applied): for readers of finished runs (report, chat, evaluate, tracking)."""
    path = Path(run_dir).expanduser() / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{Path(run_dir)}: no config.yaml there (not a run folder written by python -m pipeline)")
    try:
        written = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - any YAML damage
        raise ConfigError(f"{path}: not readable YAML ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    try:
        return load_config(written)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


STRATEGY_KEYS = ("stage.sft.strategy", "stage.rm.strategy", "stage.ppo.actor_strategy", "stage.ppo.critic_strategy")


def _without_removed_keys(user: DictConfig) -> DictConfig:
    """Run folders (config.yaml) and `+`-overrides from before tp_degree was removed: a null or 1 is
    dropped (it meant no tensor parallelism), anything else is refused with the reason."""
    user = copy.deepcopy(user)
    for path in STRATEGY_KEYS:
        node = OmegaConf.select(user, path, default=None)
        if isinstance(node, DictConfig) and "tp_degree" in node:
            value = node.get("tp_degree")
            if value not in (None, 1):
                raise ConfigError(f"{path}.tp_degree={value}: tensor-parallel generation was removed (it ran only on "
                                  "DeepSpeed's hybrid engine, which cannot run with transformers >= 4.50; see the "
                                  "README, PPO section); drop the key: ZeRO-3 shards large actors instead")
            with open_dict(node):
                node.pop("tp_degree")
    return user


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} {why}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks; each failure names the override key to change."""
    r = cfg.run
    for s in r.stages:
        _check(s in STAGES, "run.stages", r.stages, f"has {s!r}; choose from {list(STAGES)}")
    _check(len(set(r.stages)) == len(r.stages), "run.stages", r.stages, "lists a stage twice")
    _check(r.dtype is None or r.dtype in DTYPES, "run.dtype", r.dtype, f"must be one of {DTYPES}")
    _check(r.device in ("auto", "cpu", "cuda"), "run.device", r.device, "must be auto, cpu or cuda")
    _check(r.log_interval >= 1, "run.log_interval", r.log_interval, "must be >= 1")
    for logger in r.loggers:
        _check(logger in ("wandb", "tensorboard"), "run.loggers", r.loggers, "may hold wandb and tensorboard only")
    if cfg.dtype == "fp16" and cfg.hardware.device == "cpu":
        raise ConfigError("run.dtype=fp16 is not supported on CPU (DeepSpeed refuses it); use bf16 or fp32")

    for key in ("actor", "reward"):
        name = getattr(cfg.model, key)
        try:
            resolve_model(name)
        except UnknownModelError as err:
            # Unsized hub ids are allowed (the runner reports missing weights); unknown words are not.
            if "/" not in name:
                raise ConfigError(f"model.{key}={name}: {err}") from None

    try:
        validate_data_blend(cfg.data_blend)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    for name in ("sft", "rm"):
        s = getattr(cfg.stage, name)
        p = f"stage.{name}"
        _check(s.per_device_train_batch_size >= 1, f"{p}.per_device_train_batch_size", s.per_device_train_batch_size, "must be >= 1")
        _check(s.gradient_accumulation_steps >= 1, f"{p}.gradient_accumulation_steps", s.gradient_accumulation_steps, "must be >= 1")
        _check(s.num_train_epochs >= 1, f"{p}.num_train_epochs", s.num_train_epochs, "must be >= 1")
        _check(s.max_steps is None or s.max_steps >= 1, f"{p}.max_steps", s.max_steps, "must be >= 1 or null")
        _check_optim(s.optim, f"{p}.optim")
        _check_strategy(s.strategy, f"{p}.strategy")
        _check_lora(s.lora, f"{p}.lora")

    p = cfg.stage.ppo
    _check(p.per_device_generation_batch_size >= 1, "stage.ppo.per_device_generation_batch_size", p.per_device_generation_batch_size, "must be >= 1")
    # Each generation batch is cut into equal PPO minibatches.
    _check(p.per_device_training_batch_size >= 1
           and p.per_device_generation_batch_size % p.per_device_training_batch_size == 0,
           "stage.ppo.per_device_training_batch_size", p.per_device_training_batch_size,
           f"must divide stage.ppo.per_device_generation_batch_size={p.per_device_generation_batch_size}")
    _check(p.ppo_epochs >= 1, "stage.ppo.ppo_epochs", p.ppo_epochs, "must be >= 1")
    _check(p.max_steps is None or p.max_steps >= 1, "stage.ppo.max_steps", p.max_steps, "must be >= 1 or null")
    _check(0.0 <= p.gamma <= 1.0, "stage.ppo.gamma", p.gamma, "must be in [0, 1]")
    _check(0.0 <= p.lam <= 1.0, "stage.ppo.lam", p.lam, "must be in [0, 1]")
    _check(p.cliprange > 0, "stage.ppo.cliprange", p.cliprange, "must be > 0")
    _check(p.cliprange_value > 0, "stage.ppo.cliprange_value", p.cliprange_value, "must be > 0")
    _check(p.clip_reward_value > 0, "stage.ppo.clip_reward_value", p.clip_reward_value, "must be > 0")
    _check(p.kl_ctl >= 0, "stage.ppo.kl_ctl", p.kl_ctl, "must be >= 0")
    _check(p.kl_target is None or p.kl_target > 0, "stage.ppo.kl_target", p.kl_target, "must be > 0 or null")
    _check(p.unsup_coef >= 0, "stage.ppo.unsup_coef", p.unsup_coef, "must be >= 0 (0 = no PTX loss)")
    _check(0.0 < p.ema_beta < 1.0, "stage.ppo.ema_beta", p.ema_beta, "must be in (0, 1)")
    g = p.generation
    _check(g.max_new_tokens >= 1, "stage.ppo.generation.max_new_tokens", g.max_new_tokens, "must be >= 1")
    _check(g.temperature > 0, "stage.ppo.generation.temperature", g.temperature, "must be > 0")
    _check(0 < g.top_p <= 1, "stage.ppo.generation.top_p", g.top_p, "must be in (0, 1]")
    _check(g.top_k >= 0, "stage.ppo.generation.top_k", g.top_k, "must be >= 0")
    _check(g.cache in ("dynamic", "static"), "stage.ppo.generation.cache", g.cache, "must be dynamic or static")
    _check(not (g.merge_lora and g.gather_weights is False), "stage.ppo.generation.merge_lora", g.merge_lora,
           "needs the gathered weights: not with stage.ppo.generation.gather_weights=false")
    if g.backend == "deepspeed":
        raise ConfigError(deepspeed_backend_refusal())
    _check(g.backend == "hf", "stage.ppo.generation.backend", g.backend, "must be hf")
    for role in ("actor", "critic"):
        _check_optim(getattr(p, f"{role}_optim"), f"stage.ppo.{role}_optim")
        _check_strategy(getattr(p, f"{role}_strategy"), f"stage.ppo.{role}_strategy")
        _check_lora(getattr(p, f"{role}_lora"), f"stage.ppo.{role}_lora")

    dep = cfg.deployment
    _check(dep.launcher in ("in_process", "torchrun", "deepspeed", "slurm"), "deployment.launcher",
           dep.launcher, "must be in_process, torchrun, deepspeed or slurm")
    _check(dep.nodes >= 1, "deployment.nodes", dep.nodes, "must be >= 1")
    _check(dep.procs_per_node is None or dep.procs_per_node >= 1, "deployment.procs_per_node", dep.procs_per_node, "must be >= 1")
    _check(cfg.hardware.device in ("cpu", "cuda"), "hardware.device", cfg.hardware.device, "must be cpu or cuda")


def _check_optim(o: OptimSection, p: str) -> None:
    _check(o.learning_rate > 0, f"{p}.learning_rate", o.learning_rate, "must be > 0")
    _check(o.weight_decay >= 0, f"{p}.weight_decay", o.weight_decay, "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"{p}.betas", o.betas, "must be two numbers in [0, 1)")
    _check(o.lr_scheduler_type in ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"),
           f"{p}.lr_scheduler_type", o.lr_scheduler_type, "is not a transformers scheduler name")
    _check(o.num_warmup_steps >= 0, f"{p}.num_warmup_steps", o.num_warmup_steps, "must be >= 0")
    _check(o.gradient_clipping >= 0, f"{p}.gradient_clipping", o.gradient_clipping, "must be >= 0 (0 = off)")


def _check_strategy(s: StrategySection, p: str) -> None:
    _check(s.zero_stage is None or s.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", s.zero_stage, "must be 0, 1, 2 or 3")
    _check(not s.offload or s.zero_stage is None or s.zero_stage >= 1, f"{p}.offload", s.offload,
           f"needs {p}.zero_stage >= 1 (ZeRO offloads what it partitions)")


def _check_lora(lora: LoRASection, p: str) -> None:
    _check(lora.dim is None or lora.dim >= 0, f"{p}.dim", lora.dim, "must be >= 0 (0 = off)")

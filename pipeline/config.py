"""The one typed config: Hydra composes YAML, `load_config` merges it into these
dataclasses once and validates it; every other module reads `RunConfig`.

Errors name the override key, e.g.
    stage.ppo.per_device_training_batch_size=7 must divide ... (got 7)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.catalog import UnknownModelError, local_folder, model_source, resolve_model
from pipeline.data_schema import DataBlendSection, validate_data_blend
from pipeline.errors import UserError

# Every stage, in the order they run (each reads the ones before it); dpo replaces rm + ppo.
STAGES = ("sft", "rm", "ppo", "dpo")
# What a run does when run.stages is not given: InstructGPT's three steps.
DEFAULT_STAGES = ("sft", "rm", "ppo")
DTYPES = ("fp32", "bf16", "fp16")
# Step 3's advantage estimators; only gae has a critic.
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")


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


class Section:
    """Base of every config section: read-only once `freeze` has run (after validation and the
    plan), so no module changes a setting the run was validated and hashed with."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise FrozenConfigError(f"the config is frozen after validation; {type(self).__name__}.{name} cannot change "
                                    "(set it on the command line or in a YAML group instead)")
        object.__setattr__(self, name, value)


class FrozenConfigError(AttributeError):
    """Code tried to change the config after it was validated and frozen (a bug, not a user error)."""


# --------------------------------------------------------------------------- run


@dataclass
class RunSection(Section):
    # Folder name under outputs/ when output_dir is not given (default: the actor's name).
    name: str = "${model.actor}"
    # Where the run lives; each stage writes <output_dir>/<stage>/.
    output_dir: Optional[str] = None
    # Subset of stages to run, in order (DeepSpeed-Chat's --step); [sft, dpo] replaces RM + PPO with DPO.
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
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
class ModelSection(Section):
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
class LoRASection(Section):
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
class OptimSection(Section):
    learning_rate: float = 9.65e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # A transformers scheduler name (get_scheduler): linear, cosine, constant, ...
    lr_scheduler_type: str = "cosine"
    num_warmup_steps: int = 0
    # Clip the global gradient norm to this (0 = off).
    gradient_clipping: float = 1.0


@dataclass
class StrategySection(Section):
    """How a model is laid out on the devices; null fields are chosen by the planner."""

    zero_stage: Optional[int] = None
    # Offload optimizer states (ZeRO >= 1) and, with ZeRO-3, parameters to CPU memory.
    offload: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = None
    # Tensor parallelism (DeepSpeed AutoTP): every attention and MLP Linear split over this many
    # consecutive ranks of one node, which see the same batches; data parallelism runs over
    # world / tp_degree ranks (a step takes per-device batch x accumulation x world / tp_degree
    # examples). 1 = off. The models of a stage share one degree (DeepSpeed holds one tensor-parallel
    # group per process): the PPO critic the actor's; the frozen reference and reward models follow
    # their partner (the actor, the critic), as they follow its ZeRO-3 sharding. Not with LoRA.
    tp_degree: Optional[int] = None


@dataclass
class RoleSection(Section):
    """One trained model: how it learns (optimizer, LoRA) and how it is laid out (strategy)."""

    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoRASection = field(default_factory=LoRASection)
    strategy: StrategySection = field(default_factory=StrategySection)


@dataclass
class CheckpointSection(Section):
    # Save a full resumable checkpoint every N optimizer steps (0 = off) ...
    every_steps: int = 0
    # ... and/or every M minutes of training (0 = off): a long run loses at most this much.
    every_minutes: float = 30.0
    # Complete checkpoints kept; older ones are pruned.
    keep: int = 2


@dataclass
class SupervisedSection(RoleSection):
    """A stage that trains one model on a fixed data set, epoch after epoch (SFT, the reward model)."""

    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    # Cap on optimizer steps (null = the epochs decide).
    max_steps: Optional[int] = None
    # Evaluate every N optimizer steps as well (0 = only before and after training).
    eval_interval: int = 0
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class SFTSection(SupervisedSection):
    optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=9.65e-6))
    # Leave prompt tokens out of the loss (DeepSpeed-Chat keeps them in).
    mask_prompt: bool = False


@dataclass
class RMSection(SupervisedSection):
    optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=5e-5, weight_decay=0.1))


@dataclass
class GenerationSection(Section):
    max_new_tokens: int = 256
    # false = greedy decoding (evaluation runs, like-for-like comparisons); temperature 0 means greedy too.
    do_sample: bool = True
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

    @property
    def greedy(self) -> bool:
        """Decode by argmax: do_sample=false, or temperature 0 (sampling's limit)."""
        return not self.do_sample or self.temperature == 0


@dataclass
class GoldCheckSection(Section):
    """A held-out gold check against reward over-optimisation (the built-in task only: its answers have
    a ground truth, pipeline.truth): the actor answers the held-out questions greedily during PPO."""

    # Check every N PPO steps (and before the first); the share answered right is logged in
    # ppo/metrics.jsonl (split "gold"). 0 = off.
    every_steps: int = 0
    # Keep the best: ppo/final/actor is the actor of the best check (ties: the earliest), the last
    # step's actor goes to ppo/final/actor_last when they differ.
    keep_best: bool = True
    # Stop PPO early after this many checks in a row below the best one. 0 = never stop early.
    patience: int = 0


@dataclass
class PPOSection(Section):
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
    # Where the score comes from: model (the reward model of step 2) or the name of a reward function
    # registered in pipeline.rewards (e.g. gsm8k_exact_match); a function needs no reward model (no rm stage).
    reward: str = "model"
    # gae: PPO with a critic (DeepSpeed-Chat's). Critic-free (no critic is built, planned or saved):
    # grpo (group-normalised scores), rloo (leave-one-out baseline), reinforce_pp (batch-whitened returns).
    advantage_estimator: str = "gae"
    # Answers sampled per prompt (the group of grpo and rloo, >= 2 for them); a generation batch holds
    # per_device_generation_batch_size prompts x this many rows, per_device_training_batch_size counts rows.
    samples_per_prompt: int = 1
    # The KL penalty to the reference (weight kl_ctl): in the reward (per token for gae and reinforce_pp,
    # summed per answer for grpo and rloo) or in the loss (the GRPO paper's), estimated by k1 or k3.
    kl_placement: str = "reward"
    kl_estimator: str = "k1"
    # grpo: divide by the group's std (the GRPO paper); false = Dr. GRPO's unbiased centring only.
    scale_advantages_by_std: bool = True
    # How the per-token policy loss becomes a scalar: token (masked mean over the batch), sequence (mean of
    # per-answer means: the GRPO paper's length-biased one) or constant (sum / (rows x max_new_tokens): Dr. GRPO).
    loss_aggregation: str = "token"
    # Held-out prompts (the ppo slice's eval split) answered greedily before and after training when the
    # reward is a function: their accuracy and 95% interval go to the stage's results (0 = off).
    eval_prompts: int = 256
    generation: GenerationSection = field(default_factory=GenerationSection)
    # The two trained models: stage.ppo.actor.{optim,lora,strategy}, stage.ppo.critic.{...}.
    actor: RoleSection = field(default_factory=lambda: RoleSection(
        optim=OptimSection(learning_rate=9.65e-6, num_warmup_steps=100)))
    critic: RoleSection = field(default_factory=lambda: RoleSection(
        optim=OptimSection(learning_rate=5e-6, num_warmup_steps=100)))
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    # Ground truth on held-out questions during training: stage.ppo.gold_check.{every_steps,keep_best,patience}.
    gold_check: GoldCheckSection = field(default_factory=GoldCheckSection)

    @property
    def needs_critic(self) -> bool:
        """Only GAE learns a value function; the critic-free estimators build none."""
        return self.advantage_estimator == "gae"

    @property
    def reward_model(self) -> bool:
        """The score comes from a reward model (not a reward function)."""
        return self.reward == "model"

    @property
    def rows_per_generation_batch(self) -> int:
        return self.per_device_generation_batch_size * self.samples_per_prompt

    def offloads_frozen(self, role: str) -> bool:
        """Whether the frozen `ref` or `reward` model keeps its weights in host RAM: its switch, or
        when that is null (a config the planner never saw) as its partner does under ZeRO-3 + offload."""
        switch, partner = {"ref": (self.offload_reference_model, self.actor.strategy),
                           "reward": (self.offload_reward_model, self.critic.strategy)}[role]
        if switch is not None:
            return switch
        return bool(partner.offload and (partner.zero_stage or 0) >= 3)


@dataclass
class DPOSection(SupervisedSection):
    """Direct preference optimisation (Rafailov et al. 2023) of the policy that starts from sft/final (or
    model.actor) on the rm slice's preference pairs, against a frozen copy of its start (the reference)."""

    # TRL's DPOTrainer default; DPO moves a fine-tuned model with small steps.
    optim: OptimSection = field(default_factory=lambda: OptimSection(learning_rate=1e-6))
    # Strength of the pull to the reference (DeepSpeed-Chat's and TRL's 0.1): smaller lets the policy move further.
    beta: float = 0.1
    # Share of preference labels taken as flipped (conservative DPO; sigmoid only); 0 = plain DPO.
    label_smoothing: float = 0.0
    # sigmoid: DPO's loss; ipo: IPO's squared loss (Azar et al. 2023) on per-token mean log-probs.
    loss_type: str = "sigmoid"
    # The frozen reference's weights in host RAM, streamed to the device a module at a time (a ZeRO-3
    # inference engine with parameter offload), as stage.ppo.offload_reference_model. null = the planner
    # decides (on when DPO fits only so); without the planner, as the policy: on under ZeRO-3 + offload.
    offload_reference_model: Optional[bool] = None

    def offloads_reference(self) -> bool:
        """Whether the reference keeps its weights in host RAM (see offload_reference_model)."""
        if self.offload_reference_model is not None:
            return self.offload_reference_model
        return bool(self.strategy.offload and (self.strategy.zero_stage or 0) >= 3)


@dataclass
class StageSection(Section):
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    dpo: DPOSection = field(default_factory=DPOSection)


# Every trained model: (stage, role, config key of its RoleSection). The planner, validation and
# the error messages iterate this table instead of spelling the roles out.
TRAINED_ROLES = (
    ("sft", "actor", "stage.sft"),
    ("rm", "reward", "stage.rm"),
    ("ppo", "actor", "stage.ppo.actor"),
    ("ppo", "critic", "stage.ppo.critic"),
    ("dpo", "actor", "stage.dpo"),
)
# The frozen models of a stage and the key of their offload switch.
FROZEN_ROLES = (
    ("ppo", "ref", "stage.ppo.offload_reference_model"),
    ("ppo", "reward", "stage.ppo.offload_reward_model"),
    ("dpo", "ref", "stage.dpo.offload_reference_model"),
)


def at(cfg: Any, key: str) -> Any:
    """The section or value at a dotted key of a config (e.g. at(cfg, "stage.ppo.actor"))."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def role_section(cfg: RunConfig, stage: str, role: str) -> RoleSection:
    """The RoleSection of a trained model, e.g. role_section(cfg, "ppo", "critic")."""
    return at(cfg, role_key(stage, role))


def role_key(stage: str, role: str) -> str:
    return next(key for s, r, key in TRAINED_ROLES if (s, r) == (stage, role))


# --------------------------------------------------------------------------- hardware / deployment


@dataclass
class HardwareSection(Section):
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
class DeploymentSection(Section):
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
class RunConfig(Section):
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
    def ranks_per_node(self) -> int:
        """Processes on one node; a tensor-parallel group (consecutive ranks) must fit in one."""
        if self.deployment.launcher == "in_process":
            return 1
        return max(1, min(self.deployment.procs_per_node or self.hardware.devices_per_node, self.world_size))

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
        picked = self.sections(*keys, exclude=exclude)
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def sections(self, *keys: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """{dotted key: its plain value} for the named sections, less the `exclude` keys."""
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
        return picked


# --------------------------------------------------------------------------- loading + validation


def register_resolvers() -> None:
    """The resolvers the YAML uses, and the defaults node conf/config.yaml starts from.

    The node holds every key of RunConfig with its default (from the dataclasses: the values are
    written once), untyped: Hydra then lets every known key be overridden without `+`, and the one
    typed merge, with its key and type checks, happens in load_config for every source alike (YAML
    files, `key=value` and `+key=value` overrides)."""
    if not OmegaConf.has_resolver("model_source"):
        OmegaConf.register_new_resolver("model_source", model_source)
        OmegaConf.register_new_resolver("run_dir", lambda output_dir, name: output_dir or f"outputs/{name}")
    from hydra.core.config_store import ConfigStore

    defaults = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    ConfigStore.instance().store(name="run_config_schema", node=defaults)


# Keys renamed since runs were written with them: old config.yaml files are read with the new names;
# on the command line the old name is refused with the new one.
RENAMED_KEYS = {f"stage.ppo.{role}_{part}": f"stage.ppo.{role}.{part}"
                for role in ("actor", "critic") for part in ("optim", "lora", "strategy")}


def _schema_children(schema: Any) -> dict[str, Any] | None:
    """Known child nodes of a schema node; None where any key is allowed (a dict field)."""
    if not isinstance(schema, DictConfig) or not dataclasses.is_dataclass(OmegaConf.get_type(schema)):
        return None
    return {str(k): schema._get_node(k) for k in schema.keys()}


def _closest_name(name: str, names: list[str], cutoff: float) -> str:
    """The known name `name` most likely meant: one it abbreviates (lr: learning_rate) or starts,
    else the closest spelling."""
    initials = [n for n in names if "_" in n and "".join(w[0] for w in n.split("_") if w) == name]
    starts = sorted((n for n in names if n.startswith(name) and len(name) >= 3), key=len)
    spelled = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return (initials or starts or spelled or [""])[0]


def unknown_key_error(key: str, siblings: list[str]) -> ConfigError:
    """The one-line refusal of a key the schema does not have, with the closest known key."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return ConfigError(f"{key}: renamed; use {new + key[len(old):]}")
    parent, _, leaf = key.rpartition(".")
    hint = _closest_name(leaf, siblings, 0.6)
    if hint:
        hint = f"{parent}.{hint}" if parent else hint
    else:  # the right name in another section (stage.sft.mask_prompts -> stage.sft.mask_prompt)
        elsewhere = [k for k in schema_keys() if not key.startswith(k + ".")]
        leaf_hint = _closest_name(leaf, sorted({k.rsplit(".", 1)[-1] for k in elsewhere}), 0.8)
        hint = next((k for k in elsewhere if k.rsplit(".", 1)[-1] == leaf_hint), "") if leaf_hint else ""
    if hint:
        advice = f"did you mean {hint}?"
    elif siblings:
        advice = f"known keys there: {', '.join(siblings)}"
    else:
        advice = "every key is documented in pipeline/config.py and pipeline/data_schema.py"
    return ConfigError(f"unknown config key {key}; {advice}")


def _check_known_keys(user: Any, schema: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first key of `user` (a plain container) that `schema` lacks."""
    children = _schema_children(schema)
    if children is None or not isinstance(user, dict):
        if isinstance(user, list) and isinstance(schema, ListConfig) and len(schema) and user:
            for i, item in enumerate(user):
                _check_known_keys(item, schema._get_node(0), f"{prefix}[{i}]")
        elif isinstance(user, list) and isinstance(schema, ListConfig):
            element = schema._metadata.element_type
            if dataclasses.is_dataclass(element):
                for i, item in enumerate(user):
                    _check_known_keys(item, OmegaConf.structured(element), f"{prefix}[{i}]")
        return
    for key, value in user.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if str(key) not in children:
            raise unknown_key_error(full, list(children))
        _check_known_keys(value, children[str(key)], full)


def schema_keys() -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        children = _schema_children(node)
        for key, child in (children or {}).items():
            full = f"{prefix}.{key}" if prefix else key
            out.append(full)
            walk(child, full)

    walk(OmegaConf.structured(RunConfig), "")
    return out


def check_command_line(argv: list[str]) -> list[str]:
    """The arguments of `python -m pipeline ...` with every override checked (check_overrides) and
    every override of a known key made a `++` one, so that no key of the schema needs a `+` (Hydra
    wants one for keys its composed YAML lacks, such as a list item's unlisted fields). Hydra's flags
    (-m, --cfg job, --config-dir ...) pass as they are."""
    from hydra._internal.utils import get_args_parser

    from pipeline import CONF_DIR

    args, _ = get_args_parser().parse_known_args(argv)
    known = set(check_overrides(list(args.overrides), {p.name for p in CONF_DIR.iterdir() if p.is_dir()}))
    return [f"++{a.lstrip('+')}" if a in known else a for a in argv]


def check_overrides(overrides: list[str], group_names: set[str]) -> list[str]:
    """Refuse command-line overrides of keys the schema lacks (with or without `+`) and values of the
    wrong type, before Hydra composes (its own refusals are several lines and suggest `+`). Group
    choices (model=..., +experiment=demo, hydra/launcher=slurm) and hydra.* keys are Hydra's; sweeps
    and interpolations are checked when the config is loaded. Returns the overrides of schema keys
    that set a single value (those a `++` can carry)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    schema = OmegaConf.structured(RunConfig)
    parser = OverridesParser.create()
    settable = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:
            continue
        key = override.key_or_group
        if key.split(".")[0] == "hydra" or key in group_names or "/" in key:
            continue
        node: Any = schema
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if isinstance(node, ListConfig):  # a list item: its index, then the item's own keys
                element = node._metadata.element_type
                if not part.isdigit() or not dataclasses.is_dataclass(element):
                    break
                node = OmegaConf.structured(element)
                continue
            children = _schema_children(node)
            if children is None:
                break  # inside a dict field: any key
            if part not in children:
                raise unknown_key_error(".".join(parts[: depth + 1]), list(children))
            node = children[part]
        if override.is_delete() or override.is_sweep_override() or "${" in str(override.value()):
            continue
        if not any(part.isdigit() for part in parts):
            try:
                OmegaConf.update(schema, key, override.value(), merge=True)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{key}={override.get_value_element_as_str()}: {str(err).splitlines()[0]}") from None
        settable.append(text)
    return settable


def load_config(cfg: DictConfig | dict, check_paths: bool = True) -> RunConfig:
    """Merge a composed Hydra config (or a plain dict) into the schema and validate it (see validate);
    raise ConfigError."""
    register_resolvers()
    schema = OmegaConf.structured(RunConfig)
    user = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    plain = OmegaConf.to_container(user, resolve=False)  # Hydra's node may carry types that accept extra keys
    plain.pop("hydra", None)
    plain = _migrate(plain)
    _check_known_keys(plain, schema)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(plain))
        OmegaConf.resolve(merged)
        run_cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except ConfigKeyError as err:
        raise unknown_key_error(_key_of(err), []) from None
    except ValidationError as err:
        raise ConfigError(f"{_key_of(err)}: {err.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{_key_of(err)}: {str(err).splitlines()[0]}") from None
    validate(run_cfg, check_paths)
    return run_cfg


def _key_of(err: OmegaConfBaseException) -> str:
    full = getattr(err, "full_key", None)
    return str(full) if full else "?"


def _migrate(plain: dict) -> dict:
    """Old run folders' config.yaml: renamed keys moved to their new place."""
    ppo = plain.get("stage", {}).get("ppo") if isinstance(plain.get("stage"), dict) else None
    if isinstance(ppo, dict):
        for old, new in RENAMED_KEYS.items():
            old_leaf, (role, part) = old.rsplit(".", 1)[1], new.split(".")[2:]
            if old_leaf in ppo:
                ppo.setdefault(role, {})[part] = ppo.pop(old_leaf)
    return plain


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The typed, frozen config of a run folder (its config.yaml, written by the runner with the
    plan's choices applied): for readers of finished runs (report, chat, evaluate, tracking)."""
    path = Path(run_dir).expanduser() / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{Path(run_dir)}: no config.yaml there (not a run folder written by python -m pipeline)")
    try:
        written = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"{path}: not readable YAML ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    try:
        return freeze(load_config(written, check_paths=False))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def freeze(cfg: RunConfig) -> RunConfig:
    """Make every section read-only (see Section); returns cfg."""
    def walk(node: Any) -> None:
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))
            object.__setattr__(node, "_frozen", True)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(cfg)
    return cfg


def finalize(cfg: RunConfig, plan: Any) -> RunConfig:
    """The run's config: the plan's choices filled in where the user left null, validated again (a
    choice of the planner can conflict with a user setting), then frozen."""
    plan.apply(cfg)
    validate(cfg)
    return freeze(cfg)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value} {why}")


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    """Cross-field checks; each failure names the override key to change. check_paths: the models and
    the tokenizer given as local paths must be there (not for a finished run's config, whose
    models may have moved since)."""
    r = cfg.run
    for s in r.stages:
        _check(s in STAGES, "run.stages", r.stages, f"has {s!r}; choose from {list(STAGES)}")
    _check(len(set(r.stages)) == len(r.stages), "run.stages", r.stages, "lists a stage twice")
    _check(list(r.stages) == sorted(r.stages, key=STAGES.index), "run.stages", r.stages,
           f"is out of order; stages run in the order {list(STAGES)} (each reads the ones before it)")
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
            resolve_model(name, key=f"model.{key}") if check_paths else None
        except UnknownModelError as err:
            # Unsized hub ids are allowed (the runner reports missing weights); unknown words are not.
            if "/" not in name:
                raise ConfigError(f"model.{key}={name}: {err}") from None
    tokenizer = cfg.model.tokenizer
    if check_paths and tokenizer and not tokenizer.startswith("builtin"):
        local_folder(tokenizer, f"model.tokenizer={tokenizer}", tokenizer=True)

    try:
        validate_data_blend(cfg.data_blend)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    for _stage, _role, key in TRAINED_ROLES:
        section = at(cfg, key)
        _check_optim(section.optim, f"{key}.optim")
        _check_strategy(section.strategy, f"{key}.strategy")
        _check_lora(section.lora, f"{key}.lora")
        if isinstance(section, SupervisedSection):
            _check_loop(section, key)
    _check_tensor_parallel(cfg, check_paths)

    p = cfg.stage.ppo
    _check(p.per_device_generation_batch_size >= 1, "stage.ppo.per_device_generation_batch_size", p.per_device_generation_batch_size, "must be >= 1")
    _check(p.samples_per_prompt >= 1, "stage.ppo.samples_per_prompt", p.samples_per_prompt, "must be >= 1")
    _check(p.advantage_estimator in ESTIMATORS, "stage.ppo.advantage_estimator", p.advantage_estimator,
           f"must be one of {list(ESTIMATORS)}")
    _check(p.advantage_estimator not in ("grpo", "rloo") or p.samples_per_prompt >= 2, "stage.ppo.samples_per_prompt",
           p.samples_per_prompt, f"must be >= 2 for stage.ppo.advantage_estimator={p.advantage_estimator} (the "
           "group its baseline comes from)")
    # Each generation batch (prompts x samples_per_prompt rows) is cut into equal PPO minibatches.
    _check(p.per_device_training_batch_size >= 1
           and p.rows_per_generation_batch % p.per_device_training_batch_size == 0,
           "stage.ppo.per_device_training_batch_size", p.per_device_training_batch_size,
           f"must divide the rows of a generation batch, stage.ppo.per_device_generation_batch_size="
           f"{p.per_device_generation_batch_size} x stage.ppo.samples_per_prompt={p.samples_per_prompt}")
    _check(p.kl_placement in ("reward", "loss"), "stage.ppo.kl_placement", p.kl_placement, "must be reward or loss")
    _check(p.kl_estimator in ("k1", "k3"), "stage.ppo.kl_estimator", p.kl_estimator, "must be k1 or k3")
    _check(p.loss_aggregation in ("token", "sequence", "constant"), "stage.ppo.loss_aggregation", p.loss_aggregation,
           "must be token, sequence or constant")
    _check(p.eval_prompts >= 0, "stage.ppo.eval_prompts", p.eval_prompts, "must be >= 0 (0 = off)")
    if not p.reward_model:
        from pipeline.rewards import REWARD_FUNCTIONS

        _check(p.reward in REWARD_FUNCTIONS, "stage.ppo.reward", p.reward,
               f"is not a registered reward function; choose model (the reward model) or one of "
               f"{sorted(REWARD_FUNCTIONS)} (register your own with pipeline.rewards.register_reward)")
        _check(p.needs_critic or not ("rm" in r.stages and "ppo" in r.stages and "dpo" not in r.stages), "run.stages",
               r.stages, f"trains a reward model that neither stage.ppo.reward={p.reward} nor a critic (stage.ppo."
               f"advantage_estimator={p.advantage_estimator}) uses; drop rm from run.stages")
    _check(p.generation_batches >= 1, "stage.ppo.generation_batches", p.generation_batches, "must be >= 1")
    _check(p.ppo_epochs >= 1, "stage.ppo.ppo_epochs", p.ppo_epochs, "must be >= 1")
    _check(p.num_train_epochs >= 1, "stage.ppo.num_train_epochs", p.num_train_epochs, "must be >= 1")
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
    _check_checkpoint(p.checkpoint, "stage.ppo.checkpoint")
    gold = p.gold_check
    _check(gold.every_steps >= 0, "stage.ppo.gold_check.every_steps", gold.every_steps, "must be >= 0 (0 = off)")
    _check(gold.patience >= 0, "stage.ppo.gold_check.patience", gold.patience, "must be >= 0 (0 = never stop early)")
    data_names = sorted({ds.name for ds in (*cfg.data_blend.datasets, *cfg.data_blend.sft_only)})
    gold_checked = gold.every_steps > 0 and "ppo" in cfg.run.stages
    from pipeline.data.builtin import SOURCES  # here: pipeline.data imports this module

    _check(not gold_checked or set(data_names) <= set(SOURCES), "stage.ppo.gold_check.every_steps",
           gold.every_steps, f"needs answers with a ground truth (data_blend=builtin), but the data is "
           f"{', '.join(data_names)}; set it to 0")
    g = p.generation
    _check(g.max_new_tokens >= 1, "stage.ppo.generation.max_new_tokens", g.max_new_tokens, "must be >= 1")
    _check(g.temperature >= 0, "stage.ppo.generation.temperature", g.temperature, "must be >= 0 (0 = greedy decoding)")
    _check(g.do_sample or g.temperature in (0, 1), "stage.ppo.generation.temperature", g.temperature,
           "applies only when sampling, but stage.ppo.generation.do_sample=false (greedy); drop one of the two")
    for key, value, neutral in (("top_k", g.top_k, 0), ("top_p", g.top_p, 1.0)):
        _check(not g.greedy or value == neutral, f"stage.ppo.generation.{key}", value,
               "applies only when sampling, but decoding is greedy (stage.ppo.generation.do_sample=false or "
               "temperature=0); drop one of the two")
    _check(0 < g.top_p <= 1, "stage.ppo.generation.top_p", g.top_p, "must be in (0, 1]")
    _check(g.top_k >= 0, "stage.ppo.generation.top_k", g.top_k, "must be >= 0")
    _check(g.cache in ("dynamic", "static"), "stage.ppo.generation.cache", g.cache, "must be dynamic or static")
    _check(not (g.merge_lora and g.gather_weights is False), "stage.ppo.generation.merge_lora", g.merge_lora,
           "needs the actor's weights gathered for generation, but stage.ppo.generation.gather_weights=false "
           "(given, or chosen by the planner because the gathered actor does not fit one device: see the plan); "
           "set stage.ppo.generation.merge_lora=false")
    if g.backend == "deepspeed":
        raise ConfigError(deepspeed_backend_refusal())
    _check(g.backend == "hf", "stage.ppo.generation.backend", g.backend, "must be hf")

    d = cfg.stage.dpo
    _check(d.beta > 0, "stage.dpo.beta", d.beta, "must be > 0")
    _check(d.loss_type in ("sigmoid", "ipo"), "stage.dpo.loss_type", d.loss_type, "must be sigmoid or ipo")
    _check(0.0 <= d.label_smoothing < 0.5, "stage.dpo.label_smoothing", d.label_smoothing,
           "must be in [0, 0.5) (the share of labels taken as flipped)")
    _check(d.label_smoothing == 0.0 or d.loss_type == "sigmoid", "stage.dpo.label_smoothing", d.label_smoothing,
           "applies to stage.dpo.loss_type=sigmoid only (IPO has no label smoothing); set it to 0")

    dep = cfg.deployment
    _check(dep.launcher in ("in_process", "torchrun", "deepspeed", "slurm"), "deployment.launcher",
           dep.launcher, "must be in_process, torchrun, deepspeed or slurm")
    _check(dep.nodes >= 1, "deployment.nodes", dep.nodes, "must be >= 1")
    _check(dep.procs_per_node is None or dep.procs_per_node >= 1, "deployment.procs_per_node", dep.procs_per_node, "must be >= 1")
    _check(cfg.hardware.device in ("cpu", "cuda"), "hardware.device", cfg.hardware.device, "must be cpu or cuda")


def _check_loop(s: SupervisedSection, p: str) -> None:
    _check(s.per_device_train_batch_size >= 1, f"{p}.per_device_train_batch_size", s.per_device_train_batch_size, "must be >= 1")
    _check(s.per_device_eval_batch_size >= 1, f"{p}.per_device_eval_batch_size", s.per_device_eval_batch_size, "must be >= 1")
    _check(s.gradient_accumulation_steps >= 1, f"{p}.gradient_accumulation_steps", s.gradient_accumulation_steps, "must be >= 1")
    _check(s.num_train_epochs >= 1, f"{p}.num_train_epochs", s.num_train_epochs, "must be >= 1")
    _check(s.max_steps is None or s.max_steps >= 1, f"{p}.max_steps", s.max_steps, "must be >= 1 or null")
    _check(s.eval_interval >= 0, f"{p}.eval_interval", s.eval_interval, "must be >= 0 (0 = before and after training only)")
    _check_checkpoint(s.checkpoint, f"{p}.checkpoint")


def _check_checkpoint(c: CheckpointSection, p: str) -> None:
    _check(c.every_steps >= 0, f"{p}.every_steps", c.every_steps, "must be >= 0 (0 = off)")
    _check(c.every_minutes >= 0, f"{p}.every_minutes", c.every_minutes, "must be >= 0 (0 = off)")
    _check(c.keep >= 1, f"{p}.keep", c.keep, "must be >= 1")


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
    _check(s.tp_degree is None or s.tp_degree >= 1, f"{p}.tp_degree", s.tp_degree, "must be >= 1 (1 = no tensor parallelism)")


# The model config key whose architecture each trained role has (the PPO actor starts from sft/final, a
# model.actor; the critic from rm/final, a model.reward).
ROLE_MODEL_KEY = {"actor": "model.actor", "reward": "model.reward", "critic": "model.reward"}


def tensor_parallel_refusal(key: str, tp: int, name: str, heads: int, kv_heads: int | None) -> str | None:
    """Why DeepSpeed AutoTP cannot split `name` (heads attention heads, kv_heads key-value heads) over
    tp ranks, naming `key` (a role's config key); None when it can."""
    kv = kv_heads or heads
    if tp <= 1 or (heads % tp == 0 and kv % tp == 0):
        return None
    fits = [d for d in range(1, kv + 1) if heads % d == 0 and kv % d == 0]
    return (f"{key}.strategy.tp_degree={tp}: {name} has {heads} attention heads and {kv} key-value heads, which {tp} "
            f"does not divide; DeepSpeed AutoTP would split attention unevenly (whole attention on the first ranks, "
            f"memory not divided) and with dropout the ranks of a tensor-parallel group drift apart silently; "
            f"choose a degree that divides both ({', '.join(map(str, fits))})")


def _check_tensor_parallel(cfg: RunConfig, check_paths: bool) -> None:
    """What DeepSpeed AutoTP cannot run, refused before any model loads (measured in the TP research,
    see the README's "Tensor parallelism"): a degree that does not divide a node's ranks (a group
    all-reduces every layer, inside one node) or a model's heads, peft LoRA on split layers, two
    degrees in one stage (one tensor-parallel group per process), the PPO actor's EMA."""
    per_node, world = cfg.ranks_per_node, cfg.world_size
    for _stage, role, key in TRAINED_ROLES:
        section = at(cfg, key)
        tp = section.strategy.tp_degree
        if tp is None or tp == 1:
            continue
        _check(per_node % tp == 0 and world % tp == 0, f"{key}.strategy.tp_degree", tp,
               f"must divide the ranks of a node ({per_node} here: deployment.procs_per_node, else "
               f"hardware.devices_per_node; {world} in all): a tensor-parallel group is {tp} consecutive ranks "
               f"that all-reduce every layer, so it stays inside one node")
        _check(not section.lora.dim, f"{key}.lora.dim", section.lora.dim,
               f"with {key}.strategy.tp_degree={tp}: DeepSpeed AutoTP cannot shard peft LoRA layers (it splits "
               f"the adapters or drops them); set {key}.lora.dim=0 or {key}.strategy.tp_degree=1")
        model_key = ROLE_MODEL_KEY[role]
        if check_paths:
            try:
                spec = resolve_model(at(cfg, model_key), key=model_key)
            except UnknownModelError:
                spec = None  # sized when it loads (pipeline.engine checks its config.json then)
            why = spec and tensor_parallel_refusal(key, tp, f"{model_key}={spec.name}", spec.num_heads, spec.num_kv_heads)
            if why:
                raise ConfigError(why)
    p = cfg.stage.ppo
    actor_tp, critic_tp = p.actor.strategy.tp_degree, p.critic.strategy.tp_degree
    if actor_tp is not None and critic_tp is not None and actor_tp != critic_tp:
        raise ConfigError(
            f"stage.ppo.critic.strategy.tp_degree={critic_tp} with stage.ppo.actor.strategy.tp_degree={actor_tp}: "
            f"DeepSpeed keeps one tensor-parallel group per process (a later engine's degree is ignored, and an "
            f"engine without it fails once one exists), so the models of a stage share one degree; set both alike")
    _check(not (p.enable_ema and (actor_tp or 1) > 1), "stage.ppo.enable_ema", p.enable_ema,
           f"with stage.ppo.actor.strategy.tp_degree={actor_tp}: the EMA averages whole parameters and is not "
           f"written from tensor-parallel shards; set stage.ppo.enable_ema=false or the actor's tp_degree=1")


def _check_lora(lora: LoRASection, p: str) -> None:
    _check(lora.dim is None or lora.dim >= 0, f"{p}.dim", lora.dim, "must be >= 0 (0 = off)")
    _check(lora.alpha > 0, f"{p}.alpha", lora.alpha, "must be > 0")
    _check(0 <= lora.dropout < 1, f"{p}.dropout", lora.dropout, "must be in [0, 1)")
    _check(lora.learning_rate > 0, f"{p}.learning_rate", lora.learning_rate, "must be > 0")
    _check(len(lora.target_modules) > 0, f"{p}.target_modules", lora.target_modules, "must name at least one module")

"""Memory planner: per stage and role, the fastest layout that fits the hardware.

Pure arithmetic from the model catalog and the config: loads no weights, imports no deepspeed
or torch. `plan_run(cfg)` returns a `Plan`; `Plan.apply(cfg)` fills the strategy fields the user
left null; `dry_run_report(cfg)` is what `run.dry_run=true` prints.

Memory model (bytes on one device; P = parameters, d = bytes per element of the compute dtype:
2 for bf16/fp16, 4 for fp32; N = data-parallel world size)
-----------------------------------------------------------------------------------------
Trained model, mixed precision (bf16/fp16), after DeepSpeed's ZeRO paper (Rajbhandari et al.):
    weights d*P = 2P, gradients 2P, Adam fp32 master copy + momentum + variance = 4+4+4 = 12P,
    so 16 bytes/param in all. bf16 at ZeRO 0/1 runs DeepSpeed's BF16_Optimizer, which keeps an
    extra fp32 gradient accumulator (+4P: 20 bytes/param).
Trained model, fp32: weights 4P, gradients 4P, Adam momentum + variance 8P (no master copy) = 16P.
ZeRO shards over N: stage 1 the optimizer states (12P/N), stage 2 also the gradients (2P/N),
    stage 3 also the weights (2P/N).
Offload (`strategy.offload`, ZeRO >= 1): optimizer states and the fp32 gradient partition move
    to host RAM (ZeRO-Offload: 16 bytes/param/N there); with ZeRO-3 the weights too
    (ZeRO-Infinity style, d*P/N of host RAM).
LoRA (dim r): the base weights are frozen (d*P, no gradient, no optimizer state); the adapters
    (r*(in+out) per targeted Linear: r*(10h+2f) per OPT layer) are trained at the full 16 bytes.
Communication buffers: ZeRO 0-2 with N > 1 hold one gradient reduce bucket (min(P, 5e8) elements
    of d, DeepSpeed's default reduce_bucket_size); ZeRO-3 gathers one module at a time (prefetch is
    off, see engine.ds_config) and keeps a weight used twice in a forward (OPT's tied embedding and
    LM head) until its second use: budgeted as 2 * max(layer, embedding) * d, which covers both.
Frozen models (PPO reference, reward): d*P, sharded when their trained partner runs ZeRO-3 (ref
    follows the actor, reward the critic, as DeepSpeed-Chat). Offloaded (stage.ppo.offload_reference_model,
    offload_reward_model: a ZeRO-3 inference engine with parameter offload, at any partner layout)
    their weights sit in host RAM (d*P/N) and the device holds only the gather buffers.
EMA of the actor: an fp32 average of its trainable parameters (all P, or with LoRA the adapters
    only), 4 bytes each, over N under ZeRO-3 (each rank averages its partition); in host RAM when
    the actor or the reference model is offloaded.
Activations per transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation"),
    per token in elements of d: attention 3h + 2*kv (QKV input, Q, K, V, out-proj input),
    MLP h + 2f (OPT: input, fc1 output, GeLU output; SwiGLU: h + 4f), LayerNorms 2h;
    for OPT (f = 4h, kv = h) that is 16h elements = 34*s*b*h bytes minus the two dropout masks.
    Dropout adds 2 bytes/token*h of masks. Eager attention adds the softmax a*s*s*b elements (and
    with attention dropout its output and mask: the paper's 5*a*s/h term); SDPA / flash attention
    (the default for transformers' OPT and LLaMA) stores none of it, so it is off by default.
    Gradient checkpointing keeps only each layer's input (d*s*b*h per layer) plus one layer's full
    activations during its recompute.
    Language-model head: logits s*b*V in d plus fp32 copies for the loss (upcast, log-softmax and
    its gradient): (d + 8) bytes per logit. Value heads: negligible.
Generation (PPO actor): KV cache 2 * layers * b * s * kv_heads*head_dim * d; with ZeRO-3 the
    rollout engine gathers the whole actor once per generation call (d*P on each device) when that
    fits, else fetches it module by module at every decode step (slow; never from host RAM, so not
    with parameter offload unless asked): Plan.apply writes the choice to
    stage.ppo.generation.gather_weights, which the rollout engine follows.
PPO peak = every model's resident state + max(generation, experience forward, training), since
    the phases run one after another (actor and critic backward are also sequential).
Fit: peak <= (1 - HEADROOM) * device memory - fixed overhead (CUDA context, cuBLAS/NCCL
    workspaces and allocator fragmentation: 1 GiB on GPU; the torch runtime: 0.5 GiB per CPU
    process). On CPU, the device memory is the job's RAM shared by the processes on a node.

Order of preference (fastest first; the first that fits wins)
-------------------------------------------------------------
1. ZeRO-0 < ZeRO-1 < ZeRO-2 < ZeRO-3: each stage adds communication (ZeRO-3 re-gathers weights
   every forward and backward, 1.5x the traffic of data parallelism), so the least sharding
   that fits is the fastest.
2. + gradient checkpointing: one extra forward per step (~33% more compute) but no extra traffic.
3. + LoRA: fewer gradients and optimizer states and a cheaper backward, but it changes what is
   learned; DeepSpeed-Chat's own single-GPU presets use it (dim 128), and it still beats offload
   on speed.
4. + optimizer offload (ZeRO 1/2 + offload): Adam on the CPU and gradients over PCIe every step.
5. + parameter offload (ZeRO-3 + offload): weights over PCIe every forward and backward too.
Within an offload level: full fine-tuning before LoRA, then no checkpointing before checkpointing,
then the lower ZeRO stage first. For PPO, layouts are ranked by, in this order:
  1. the actor (the larger model, which also generates): generation gathering the whole ZeRO-3
     actor once per call before module-by-module fetching (which re-gathers every module per token),
     then its offload level, LoRA and checkpointing as above;
  2. the critic's offload level, LoRA and checkpointing;
  3. offloading the frozen reference and reward models (fewest bytes first): one host-to-device
     copy of their weights per experience batch, no extra compute, so it beats any lever above;
     never chosen on a CPU device;
  4. the actor's ZeRO stage, then the critic's: the cheapest levers, so they are raised first.
Explicit user settings always win: they filter the
candidates, and when none of the remaining ones fits the planner warns and suggests what would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.catalog import ModelSpec, UnknownModelError, resolve_model

GIB = 2**30
HEADROOM = 0.10
OVERHEAD_GIB = {"cuda": 1.0, "cpu": 0.5}
DEFAULT_LORA_DIM = 128
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size, elements
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Assumed host RAM per node, as a multiple of the node's total GPU memory, when the profile
# does not say (DGX A100/H100: 2 TB for 640 GB of GPU memory).
HOST_RAM_PER_GPU_RAM = 3.0


# =========================================================================== formulas


def lora_params(spec: ModelSpec, dim: int) -> int:
    """Trainable adapter parameters for LoRA of rank `dim` on every attention and MLP Linear.

    A Linear(in, out) gets A (dim x in) and B (out x dim): dim * (in + out).
    OPT layer: q, k, v, out (h -> h) and fc1 (h -> f), fc2 (f -> h): dim * (10h + 2f).
    LLaMA layer: q, o (h -> h), k, v (h -> kv), gate, up (h -> f), down (f -> h): dim * (9h + 2kv + 3f).
    """
    if dim <= 0:
        return 0
    h, f = spec.hidden_size, spec.ffn_dim
    if spec.family == "llama":
        kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
        per_layer = 9 * h + 2 * kv + 3 * f
    else:
        per_layer = 10 * h + 2 * f
    return dim * per_layer * spec.num_layers


def reward_params(spec: ModelSpec) -> int:
    """A reward / critic model: the transformer without LM head plus a Linear(h, 1) value head."""
    head = 0 if spec.tied_embeddings else spec.vocab_size * spec.hidden_size
    return spec.num_params() - head + spec.hidden_size


def layer_params(spec: ModelSpec) -> int:
    h, f = spec.hidden_size, spec.ffn_dim
    kv = (spec.num_kv_heads or spec.num_heads) * (h // spec.num_heads)
    if spec.family == "llama":
        return 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return 4 * (h * h + h) + 2 * h * f + f + h + 4 * h


def trained_state_bytes(n_params: int, n_trainable: int, dtype: str, zero: int, offload: bool,
                        world: int) -> dict[str, float]:
    """Weights, gradients and optimizer states of a trained model on one device, and in host RAM.

    n_params counts every weight (frozen base + adapters); n_trainable those with gradients.
    Returns {"params", "grads", "optimizer", "host"} in bytes (host: per rank).
    """
    d = DTYPE_BYTES[dtype]
    n = max(1, world)
    mixed = dtype != "fp32"
    offload = offload and zero >= 1
    params = n_params * d / (n if zero >= 3 else 1)
    grads = n_trainable * d / (n if zero >= 2 else 1)
    if mixed and dtype == "bf16" and zero <= 1:
        grads += n_trainable * 4  # BF16_Optimizer's fp32 gradient accumulator
    optim = n_trainable * (12 if mixed else 8) / (n if zero >= 1 else 1)
    host = 0.0
    if offload:
        # ZeRO-Offload: optimizer states and the fp32 gradient partition live in host RAM;
        # the device keeps only its low-precision gradient partition while it is reduced.
        host += optim + n_trainable * 4 / n
        optim = 0.0
        grads = n_trainable * d / n if zero >= 2 else grads
        if zero >= 3:
            host += params
            params = 0.0
    return {"params": params, "grads": grads, "optimizer": optim, "host": host}


def frozen_state_bytes(n_params: int, dtype: str, zero: int, offload: bool, world: int) -> dict[str, float]:
    """A frozen model (reference, reward): weights only, sharded with ZeRO-3, in host RAM with offload."""
    d = DTYPE_BYTES[dtype]
    params = n_params * d / (max(1, world) if zero >= 3 else 1)
    host = 0.0
    if zero >= 3 and offload:
        host, params = params, 0.0
    return {"params": params, "grads": 0.0, "optimizer": 0.0, "host": host}


def comm_buffer_bytes(spec: ModelSpec, n_params: int, n_trainable: int, dtype: str, zero: int,
                      world: int, trained: bool) -> float:
    """ZeRO-3 gather buffers (current + prefetched layer) or the ZeRO 0-2 reduce bucket."""
    d = DTYPE_BYTES[dtype]
    if zero >= 3:  # also at N = 1: the gathered layer is a fresh tensor next to the shard
        emb = spec.vocab_size * (spec.embed_dim or spec.hidden_size)
        return float(2 * max(layer_params(spec), emb) * d)
    if trained and world > 1:
        return min(n_trainable, REDUCE_BUCKET) * d
    return 0.0


def layer_activation_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, *, dropout: bool = False,
                           eager_attention: bool = False) -> float:
    """Activations one transformer layer keeps for its backward (Korthikanti et al.), bytes."""
    d = DTYPE_BYTES[dtype]
    h, f, a = spec.hidden_size, spec.ffn_dim, spec.num_heads
    kv = (spec.num_kv_heads or a) * (h // a)
    mlp = h + (4 * f if spec.family == "llama" else 2 * f)
    per_token = (3 * h + 2 * kv + mlp + 2 * h) * d
    if dropout:
        per_token += 2 * h  # two 1-byte dropout masks (attention output, MLP output)
    total = per_token * seq * batch
    if eager_attention:
        total += a * seq * seq * batch * d  # softmax output
    return float(total)


def training_activation_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, *, grad_ckpt: bool,
                              lm_head: bool, dropout: bool = False, eager_attention: bool = False) -> float:
    """Peak activation memory of one training micro-batch (forward + loss + backward), bytes.

    No checkpointing: layers * per-layer activations. Checkpointing: each layer's input
    (d*s*b*h) plus one layer's activations while it is recomputed. Plus embeddings and final
    norm (2*d*s*b*h) and, for a language model, logits s*b*V at (d + 8) bytes.
    """
    d = DTYPE_BYTES[dtype]
    sbh = seq * batch * spec.hidden_size
    layer = layer_activation_bytes(spec, batch, seq, dtype, dropout=dropout, eager_attention=eager_attention)
    body = spec.num_layers * d * sbh + layer if grad_ckpt else spec.num_layers * layer
    head = seq * batch * spec.vocab_size * (d + 8) if lm_head else seq * batch * 4
    return float(body + 2 * d * sbh + head)


def kv_cache_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str) -> float:
    """KV cache: 2 (K and V) * layers * b * s * kv_heads * head_dim * d."""
    d = DTYPE_BYTES[dtype]
    head_dim = spec.hidden_size // spec.num_heads
    kv = (spec.num_kv_heads or spec.num_heads) * head_dim
    return float(2 * spec.num_layers * batch * seq * kv * d)


def forward_transient_bytes(spec: ModelSpec, batch: int, seq: int, dtype: str, *, lm_head: bool) -> float:
    """A no-grad forward (PPO experience, generation prefill): one layer's working set plus the
    full-sequence logits and their fp32 log-softmax (lm_head) — nothing is kept per layer."""
    d = DTYPE_BYTES[dtype]
    work = seq * batch * (2 * spec.hidden_size + spec.ffn_dim) * d
    head = seq * batch * spec.vocab_size * (d + 8) if lm_head else 0
    return float(work + head)


# =========================================================================== plan objects


@dataclass(frozen=True)
class Strategy:
    zero_stage: int = 0
    offload: bool = False
    gradient_checkpointing: bool = False
    lora_dim: int = 0

    def label(self) -> str:
        return (f"ZeRO-{self.zero_stage}{' +offload' if self.offload else ''}"
                f"{' +ckpt' if self.gradient_checkpointing else ''}{f' +LoRA{self.lora_dim}' if self.lora_dim else ''}")


@dataclass
class RolePlan:
    role: str
    model: str
    params: int
    trained: bool
    strategy: Strategy
    device_gib: float  # this role's resident state + its own transient peak
    host_gib: float
    breakdown: dict[str, float] = field(default_factory=dict)  # GiB
    explicit: dict[str, Any] = field(default_factory=dict)


@dataclass
class StagePlan:
    stage: str
    roles: list[RolePlan]
    peak_gib: float
    usable_gib: float
    device_gib: float
    host_gib: float
    fits: bool
    active: bool  # in run.stages
    phases: dict[str, float] = field(default_factory=dict)
    generation_gathers_params: Optional[bool] = None

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.role == name)


# Which config fields hold each trained role's strategy and LoRA.
_FIELDS = {
    ("sft", "actor"): ("sft", "strategy", "lora"),
    ("rm", "reward"): ("rm", "strategy", "lora"),
    ("ppo", "actor"): ("ppo", "actor_strategy", "actor_lora"),
    ("ppo", "critic"): ("ppo", "critic_strategy", "critic_lora"),
}
# Which config field switches each frozen role's offload.
_FROZEN_FIELDS = {("ppo", "ref"): "offload_reference_model", ("ppo", "reward"): "offload_reward_model"}


@dataclass
class Plan:
    hardware: str
    device: str
    world_size: int
    dtype: str
    stages: dict[str, StagePlan]
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages.values() if s.active)

    def apply(self, cfg: Any) -> None:
        """Fill the strategy and LoRA fields the user left null (explicit values stay)."""
        for (stage, role), (sec, strat_name, lora_name) in _FIELDS.items():
            chosen = self.stages[stage].role(role).strategy
            section = getattr(cfg.stage, sec)
            strat, lora = getattr(section, strat_name), getattr(section, lora_name)
            for key in ("zero_stage", "offload", "gradient_checkpointing"):
                if getattr(strat, key) is None:
                    setattr(strat, key, getattr(chosen, key))
            if lora.dim is None:
                lora.dim = chosen.lora_dim
        for (stage, role), name in _FROZEN_FIELDS.items():
            section = getattr(cfg.stage, stage)
            if getattr(section, name) is None:
                setattr(section, name, self.stages[stage].role(role).strategy.offload)
        generation = cfg.stage.ppo.generation
        if generation.gather_weights is None:
            generation.gather_weights = self.stages["ppo"].generation_gathers_params

    def to_dict(self) -> dict[str, Any]:
        out = {
            "hardware": self.hardware, "device": self.device, "world_size": self.world_size,
            "dtype": self.dtype, "headroom": HEADROOM, "fits": self.fits,
            "warnings": list(self.warnings), "suggestions": list(self.suggestions), "stages": {},
        }
        for name, sp in self.stages.items():
            out["stages"][name] = {
                "active": sp.active, "fits": sp.fits, "peak_gib": round(sp.peak_gib, 3),
                "usable_gib": round(sp.usable_gib, 3), "device_gib": sp.device_gib,
                "host_gib_per_rank": round(sp.host_gib, 3),
                "phases_gib": {k: round(v, 3) for k, v in sp.phases.items()},
                "generation_gathers_params": sp.generation_gathers_params,
                "roles": [{
                    "role": r.role, "model": r.model, "params": r.params, "trained": r.trained,
                    **dataclasses.asdict(r.strategy), "device_gib": round(r.device_gib, 3),
                    "host_gib": round(r.host_gib, 3),
                    "breakdown_gib": {k: round(v, 3) for k, v in r.breakdown.items()},
                    "explicit": r.explicit,
                } for r in sp.roles],
            }
        json.dumps(out)  # guaranteed serialisable
        return out

    def save(self, run_dir: Any) -> None:
        """Write <run_dir>/plan.json (to_dict) and <run_dir>/plan.txt (the table and notes)."""
        from pathlib import Path

        out = Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        from pipeline.files import atomic_write, write_json_atomic

        write_json_atomic(out / "plan.json", self.to_dict())
        notes = [self.table()] + [f"warning: {w}" for w in self.warnings] + [f"would fit: {x}" for x in self.suggestions]
        atomic_write(out / "plan.txt", "\n".join(notes) + "\n")

    def table(self) -> str:
        head = ["stage", "role", "model", "params", "ZeRO", "offload", "LoRA", "grad ckpt",
                "GiB/device", "device GiB", "fits?"]
        rows = []
        for name, sp in self.stages.items():
            for r in sp.roles:
                s = r.strategy
                rows.append([name if sp.active else f"({name})", r.role, r.model, _fmt_params(r.params),
                             str(s.zero_stage), "yes" if s.offload else "no", str(s.lora_dim) if s.lora_dim else "-",
                             "yes" if s.gradient_checkpointing else "no",
                             f"{r.device_gib:.1f}", "", ""])
            rows.append([name if sp.active else f"({name})", "= peak", "", "", "", "", "", "",
                         f"{sp.peak_gib:.1f}", f"{sp.device_gib:.1f} ({sp.usable_gib:.1f} usable)",
                         "yes" if sp.fits else "NO"])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), sep] + [line(r) for r in rows])


def _fmt_params(n: int) -> str:
    if n <= 0:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# =========================================================================== inputs


@dataclass(frozen=True)
class _Constraint:
    zero_stage: Optional[int] = None
    offload: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = None
    lora_dim: Optional[int] = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class _Inputs:
    device: str
    memory_gib: float
    ranks_per_node: int
    world: int
    dtype: str
    host_gib: float  # host RAM per node
    dropout: bool
    actor: Optional[ModelSpec]
    reward: Optional[ModelSpec]
    actor_name: str
    reward_name: str
    sft_batch: int
    rm_batch: int
    ppo_gen_batch: int
    ppo_train_batch: int
    prompt_len: int
    answer_len: int
    new_tokens: int
    ema: bool
    gather_weights: Optional[bool] = None  # stage.ppo.generation.gather_weights
    constraints: tuple = ()  # ((stage, role), _Constraint) pairs

    def constraint(self, stage: str, role: str) -> _Constraint:
        return dict(self.constraints).get((stage, role), _Constraint())

    @property
    def device_gib(self) -> float:
        return self.memory_gib / self.ranks_per_node if self.device == "cpu" else self.memory_gib

    @property
    def usable_gib(self) -> float:
        return self.device_gib * (1 - HEADROOM) - OVERHEAD_GIB.get(self.device, 1.0)

    @property
    def host_gib_per_rank(self) -> float:
        return self.host_gib / self.ranks_per_node


def _spec(name: str) -> Optional[ModelSpec]:
    try:
        return resolve_model(name)
    except UnknownModelError:
        return None


def _inputs(cfg: Any) -> _Inputs:
    hw = cfg.hardware
    world = cfg.world_size
    per_node = cfg.deployment.procs_per_node or (hw.devices_per_node if cfg.deployment.launcher != "in_process" else 1)
    per_node = max(1, min(per_node, world))
    host = getattr(hw, "host_memory_gib", None)
    if host is None:
        host = hw.memory_gib if hw.device == "cpu" else HOST_RAM_PER_GPU_RAM * hw.memory_gib * max(1, hw.devices_per_node)
    cons = []
    for (stage, role), (sec, strat_name, lora_name) in _FIELDS.items():
        section = getattr(cfg.stage, sec)
        s, lora = getattr(section, strat_name), getattr(section, lora_name)
        cons.append(((stage, role), _Constraint(s.zero_stage, s.offload, s.gradient_checkpointing, lora.dim)))
    for (stage, role), name in _FROZEN_FIELDS.items():
        cons.append(((stage, role), _Constraint(offload=getattr(getattr(cfg.stage, stage), name))))
    dropout = cfg.model.dropout
    return _Inputs(
        device=hw.device, memory_gib=float(hw.memory_gib), ranks_per_node=per_node, world=world,
        dtype=cfg.dtype, host_gib=float(host),
        dropout=bool(dropout is None or dropout > 0),
        actor=_spec(cfg.model.actor), reward=_spec(cfg.model.reward),
        actor_name=cfg.model.actor, reward_name=cfg.model.reward,
        sft_batch=cfg.stage.sft.per_device_train_batch_size, rm_batch=cfg.stage.rm.per_device_train_batch_size,
        ppo_gen_batch=cfg.stage.ppo.per_device_generation_batch_size,
        ppo_train_batch=cfg.stage.ppo.per_device_training_batch_size,
        prompt_len=cfg.data_blend.max_prompt_len, answer_len=cfg.data_blend.max_answer_len,
        new_tokens=cfg.stage.ppo.generation.max_new_tokens, ema=cfg.stage.ppo.enable_ema,
        gather_weights=cfg.stage.ppo.generation.gather_weights,
        constraints=tuple(cons),
    )


# =========================================================================== search


def _offload_level(s: Strategy) -> int:
    return 0 if not s.offload else (2 if s.zero_stage >= 3 else 1)


def _candidates(inp: _Inputs, c: _Constraint) -> list[Strategy]:
    """Training layouts allowed by the explicit settings, fastest first (see module docstring)."""
    zeros = [c.zero_stage] if c.zero_stage is not None else [0, 1, 2, 3]
    if c.offload is not None:
        offs = [c.offload]
    else:
        offs = [False, True] if inp.device == "cuda" else [False]
    gcs = [c.gradient_checkpointing] if c.gradient_checkpointing is not None else [False, True]
    loras = [c.lora_dim] if c.lora_dim is not None else [0, DEFAULT_LORA_DIM]
    out = []
    for z in zeros:
        for off in offs:
            if off and z == 0 and c.offload is None:
                continue  # offload needs ZeRO >= 1
            for gc in gcs:
                for lora in loras:
                    out.append(Strategy(z, off, gc, lora))
    out.sort(key=lambda s: (_offload_level(s), s.lora_dim > 0, s.gradient_checkpointing, s.zero_stage))
    return out


@dataclass
class _RoleMem:
    state: float  # resident bytes on device
    host: float
    act: float  # training transient
    breakdown: dict[str, float]


@functools.lru_cache(maxsize=8192)
def _trained_mem(inp: _Inputs, spec: ModelSpec, s: Strategy, *, lm: bool, batch: int, seq: int) -> _RoleMem:
    base = spec.num_params() if lm else reward_params(spec)
    adapters = lora_params(spec, s.lora_dim)
    n_params, n_train = base + adapters, (adapters if s.lora_dim > 0 else base)
    st = trained_state_bytes(n_params, n_train, inp.dtype, s.zero_stage, s.offload, inp.world)
    buf = comm_buffer_bytes(spec, n_params, n_train, inp.dtype, s.zero_stage, inp.world, True)
    act = training_activation_bytes(spec, batch, seq, inp.dtype, grad_ckpt=s.gradient_checkpointing,
                                    lm_head=lm, dropout=inp.dropout)
    state = st["params"] + st["grads"] + st["optimizer"] + buf
    bd = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"], "buffers": buf,
          "activations": act}
    return _RoleMem(state, st["host"], act, {k: v / GIB for k, v in bd.items()})


def _frozen_strategy(partner: Strategy, offload: bool) -> Strategy:
    """A frozen model's layout: ZeRO-3 when offloaded or when its trained partner runs ZeRO-3."""
    return Strategy(3 if offload or partner.zero_stage >= 3 else 0, offload)


@functools.lru_cache(maxsize=8192)
def _frozen_mem(inp: _Inputs, spec: ModelSpec, layout: Strategy, *, lm: bool) -> _RoleMem:
    n = spec.num_params() if lm else reward_params(spec)
    st = frozen_state_bytes(n, inp.dtype, layout.zero_stage, layout.offload, inp.world)
    buf = comm_buffer_bytes(spec, n, 0, inp.dtype, layout.zero_stage, inp.world, False) if layout.zero_stage >= 3 else 0.0
    return _RoleMem(st["params"] + buf, st["host"], 0.0, {"params": st["params"] / GIB, "buffers": buf / GIB})


@functools.lru_cache(maxsize=8192)
def _ema_mem(spec: ModelSpec, actor: Strategy, world: int, on_host: bool) -> _RoleMem:
    trained = lora_params(spec, actor.lora_dim) if actor.lora_dim else spec.num_params()
    fp32 = 4.0 * trained / (world if actor.zero_stage >= 3 else 1)
    return _RoleMem(0.0 if on_host else fp32, fp32 if on_host else 0.0, 0.0, {"params": 0.0 if on_host else fp32 / GIB})


def _fallback_strategy(inp: _Inputs, c: _Constraint) -> Strategy:
    """Layout for a model whose size is unknown: explicit values, else shard and checkpoint."""
    return Strategy(
        c.zero_stage if c.zero_stage is not None else (3 if inp.world > 1 else 0),
        bool(c.offload) if c.offload is not None else False,
        c.gradient_checkpointing if c.gradient_checkpointing is not None else True,
        c.lora_dim if c.lora_dim is not None else 0,
    )


def _unknown_stage(inp: _Inputs, stage: str, active: bool, roles: list[tuple[str, str, bool]]) -> StagePlan:
    plans = []
    for role, name, trained in roles:
        c = inp.constraint(stage, role) if trained else _Constraint()
        plans.append(RolePlan(role, name, 0, trained, _fallback_strategy(inp, c), 0.0, 0.0, {}, c.given()))
    return StagePlan(stage, plans, 0.0, inp.usable_gib, inp.device_gib, 0.0, True, active)


def _single_stage(inp: _Inputs, stage: str, role: str, spec: Optional[ModelSpec], name: str, *, lm: bool,
                  batch: int, seq: int, active: bool) -> StagePlan:
    if spec is None:
        return _unknown_stage(inp, stage, active, [(role, name, True)])
    c = inp.constraint(stage, role)
    usable = inp.usable_gib * GIB
    cands = _candidates(inp, c)
    chosen, mem = None, None
    for s in cands:
        m = _trained_mem(inp, spec, s, lm=lm, batch=batch, seq=seq)
        if m.state + m.act <= usable and m.host <= inp.host_gib_per_rank * GIB:
            chosen, mem = s, m
            break
    fits = chosen is not None
    if not fits:  # the most frugal allowed layout, reported as not fitting
        def total(s: Strategy) -> float:
            m = _trained_mem(inp, spec, s, lm=lm, batch=batch, seq=seq)
            return m.state + m.act

        best = min(cands, key=total)
        chosen, mem = best, _trained_mem(inp, spec, best, lm=lm, batch=batch, seq=seq)
    n = (spec.num_params() if lm else reward_params(spec))
    peak = (mem.state + mem.act) / GIB
    rp = RolePlan(role, name, n, True, chosen, peak, mem.host / GIB, mem.breakdown, c.given())
    return StagePlan(stage, [rp], peak, inp.usable_gib, inp.device_gib, mem.host / GIB, fits, active,
                     {"train": peak})


def _gather_options(a: Strategy, given: Optional[bool]) -> list[bool]:
    """Whether generation gathers the whole actor at once, preferred first (stage.ppo.generation.
    gather_weights when given); per-module fetching exists only for a ZeRO-3 actor."""
    if a.zero_stage < 3:
        return [True]
    if given is not None:
        return [given]
    return [True, False] if not a.offload else [True]


def _frozen_offload_options(inp: _Inputs, c: _Constraint) -> list[bool]:
    if c.offload is not None:
        return [c.offload]
    return [False, True] if inp.device == "cuda" else [False]


def _ppo_unknown(inp: _Inputs, active: bool) -> StagePlan:
    """A model of unknown size: fallback layouts; a frozen model offloads when told to, or when its
    partner runs ZeRO-3 + offload (what the engine does with a null switch)."""
    sp = _unknown_stage(inp, "ppo", active, [("actor", inp.actor_name, True), ("critic", inp.reward_name, True)])
    a, c = sp.role("actor").strategy, sp.role("critic").strategy
    for role, name, partner in (("ref", inp.actor_name, a), ("reward", inp.reward_name, c)):
        given = inp.constraint("ppo", role)
        offload = given.offload if given.offload is not None else (partner.offload and partner.zero_stage >= 3)
        sp.roles.append(RolePlan(role, name, 0, False, _frozen_strategy(partner, offload), 0.0, 0.0, {}, given.given()))
    if inp.ema:
        sp.roles.append(RolePlan("ema", inp.actor_name, 0, False,
                                 Strategy(3 if a.zero_stage >= 3 else 0, a.offload or sp.role("ref").strategy.offload),
                                 0.0, 0.0, {}))
    return sp


def _ppo_stage(inp: _Inputs, active: bool) -> StagePlan:
    if inp.actor is None or inp.reward is None:
        return _ppo_unknown(inp, active)
    A, R = inp.actor, inp.reward
    d = DTYPE_BYTES[inp.dtype]
    seq = inp.prompt_len + inp.new_tokens
    ca, cc = inp.constraint("ppo", "actor"), inp.constraint("ppo", "critic")
    cref, crew = inp.constraint("ppo", "ref"), inp.constraint("ppo", "reward")
    usable, host_cap = inp.usable_gib * GIB, inp.host_gib_per_rank * GIB

    n_actor, n_reward = A.num_params(), reward_params(R)
    kv_full = kv_cache_bytes(A, inp.ppo_gen_batch, seq, inp.dtype)
    prefill = forward_transient_bytes(A, inp.ppo_gen_batch, inp.prompt_len, inp.dtype, lm_head=False) \
        + inp.ppo_gen_batch * A.vocab_size * (d + 8)
    experience = max(forward_transient_bytes(A, inp.ppo_gen_batch, seq, inp.dtype, lm_head=True),
                     forward_transient_bytes(R, inp.ppo_gen_batch, seq, inp.dtype, lm_head=False))

    def gen_bytes(a: Strategy, gather: bool) -> float:
        lora_extra = lora_params(A, a.lora_dim) * d
        weights = n_actor * d + lora_extra if a.zero_stage >= 3 and gather else 0.0  # gathered copy (the shard stays)
        return weights + kv_full + prefill

    # A layout is an actor side (its layout, whole-actor gathering or not), the reference model's
    # offload (with the EMA's place) and a critic side (its layout, the reward model's offload),
    # ranked as the module docstring says: groups by costly levers, ZeRO stages within a group.
    actor_groups: dict[tuple, list] = {}
    for a in _candidates(inp, ca):  # lower ZeRO stage first within a group
        am = _trained_mem(inp, A, a, lm=True, batch=inp.ppo_train_batch, seq=seq)
        frozen = {}
        for ref_off in _frozen_offload_options(inp, cref):
            frozen[ref_off] = {"ref": _frozen_mem(inp, A, _frozen_strategy(a, ref_off), lm=True)}
            if inp.ema:
                frozen[ref_off]["ema"] = _ema_mem(A, a, inp.world, a.offload or ref_off)
        for gather in _gather_options(a, inp.gather_weights):
            key = (not gather, _offload_level(a), a.lora_dim > 0, a.gradient_checkpointing)
            actor_groups.setdefault(key, []).append((a, gather, am, frozen, max(am.act, gen_bytes(a, gather), experience)))
    critic_groups: dict[tuple, list] = {}
    for c in _candidates(inp, cc):
        cm = _trained_mem(inp, R, c, lm=False, batch=inp.ppo_train_batch, seq=seq)
        for rew_off in _frozen_offload_options(inp, crew):
            side_c = (c, rew_off, {"critic": cm, "reward": _frozen_mem(inp, R, _frozen_strategy(c, rew_off), lm=False)})
            for ref_off in _frozen_offload_options(inp, cref):
                key = (_offload_level(c), c.lora_dim > 0, c.gradient_checkpointing, ref_off * n_actor + rew_off * n_reward)
                critic_groups.setdefault(key, []).append((ref_off, side_c))

    def memory(side_a, ref_off, side_c) -> dict[str, _RoleMem]:
        return {"actor": side_a[2], **side_a[3][ref_off], **side_c[2]}

    def layouts():
        for a_key in sorted(actor_groups):
            for c_key in sorted(critic_groups):
                for side_a in actor_groups[a_key]:
                    for ref_off, side_c in critic_groups[c_key]:
                        yield side_a, ref_off, side_c

    chosen, smallest = None, None
    for layout in layouts():
        mems = memory(*layout)
        peak = sum(m.state for m in mems.values()) + max(layout[0][4], mems["critic"].act)
        if peak <= usable and sum(m.host for m in mems.values()) <= host_cap:
            chosen = layout
            break
        if smallest is None or peak < smallest[0]:
            smallest = (peak, layout)
    fit = chosen is not None
    if not fit:  # the layout with the smallest peak, reported as not fitting
        chosen = smallest[1]
    mems = memory(*chosen)
    (a, gather, am, _, transient), ref_off, (c, rew_off, _) = chosen
    cm = mems["critic"]
    ref_s, rew_s = _frozen_strategy(a, ref_off), _frozen_strategy(c, rew_off)
    resident = sum(m.state for m in mems.values())
    host = sum(m.host for m in mems.values())
    peak = resident + max(transient, cm.act)
    phases = {"generation": gen_bytes(a, gather), "experience": experience, "train": max(am.act, cm.act)}
    gen_a = gen_bytes(a, gather)
    roles = [
        RolePlan("actor", inp.actor_name, n_actor, True, a,
                 (am.state + max(am.act, gen_a, experience)) / GIB, am.host / GIB,
                 {**am.breakdown, "generation": gen_a / GIB}, ca.given()),
        RolePlan("critic", inp.reward_name, n_reward, True, c, (cm.state + cm.act) / GIB, cm.host / GIB,
                 cm.breakdown, cc.given()),
    ]
    for role, name, n, layout, given in (("ref", inp.actor_name, n_actor, ref_s, cref),
                                         ("reward", inp.reward_name, n_reward, rew_s, crew)):
        m = mems[role]
        roles.append(RolePlan(role, name, n, False, layout, m.state / GIB, m.host / GIB, m.breakdown, given.given()))
    if inp.ema:
        m = mems["ema"]
        averaged = lora_params(A, a.lora_dim) if a.lora_dim else n_actor
        roles.append(RolePlan("ema", inp.actor_name, averaged, False, Strategy(3 if a.zero_stage >= 3 else 0, m.host > 0), m.state / GIB,
                              m.host / GIB, m.breakdown))
    ph = {"resident": resident / GIB, **{k: v / GIB for k, v in phases.items()}}
    return StagePlan("ppo", roles, peak / GIB, inp.usable_gib, inp.device_gib, host / GIB, fit, active, ph,
                     generation_gathers_params=(gather if a.zero_stage >= 3 else None))


def _plan_stage(inp: _Inputs, stage: str, active: set[str]) -> StagePlan:
    full = inp.prompt_len + inp.answer_len
    if stage == "sft":
        return _single_stage(inp, "sft", "actor", inp.actor, inp.actor_name, lm=True, batch=inp.sft_batch,
                             seq=full, active="sft" in active)
    if stage == "rm":  # chosen and rejected go through the model in one forward: 2 x batch
        return _single_stage(inp, "rm", "reward", inp.reward, inp.reward_name, lm=False, batch=2 * inp.rm_batch,
                             seq=full, active="rm" in active)
    return _ppo_stage(inp, "ppo" in active)


def _plan_stages(inp: _Inputs, active: set[str]) -> dict[str, StagePlan]:
    return {stage: _plan_stage(inp, stage, active) for stage in ("sft", "rm", "ppo")}


# =========================================================================== warnings + suggestions


_BATCH_KEY = {"sft": ["stage.sft.per_device_train_batch_size"], "rm": ["stage.rm.per_device_train_batch_size"],
              "ppo": ["stage.ppo.per_device_generation_batch_size", "stage.ppo.per_device_training_batch_size"]}
_BATCH_FIELD = {"sft": ["sft_batch"], "rm": ["rm_batch"], "ppo": ["ppo_gen_batch", "ppo_train_batch"]}


def _setting_key(stage: str, role: str, name: str) -> str:
    """The config key of one layout setting (a _Constraint field) of a role."""
    if (stage, role) in _FROZEN_FIELDS:
        return f"stage.{stage}.{_FROZEN_FIELDS[(stage, role)]}"
    sec, strat, lora = _FIELDS[(stage, role)]
    return f"stage.{sec}.{lora}.dim" if name == "lora_dim" else f"stage.{sec}.{strat}.{name}"


def _explicit_warnings(inp: _Inputs) -> list[str]:
    out = []
    for (stage, role), c in inp.constraints:
        if c.offload and c.zero_stage == 0:
            sk = _setting_key(stage, role, "zero_stage").rsplit(".", 1)[0]
            out.append(f"{sk}.offload=true has no effect with {sk}.zero_stage=0 (offload needs ZeRO >= 1)")
        if c.offload and inp.device == "cpu":
            out.append(f"{_setting_key(stage, role, 'offload')}=true on a CPU device only moves memory within the same RAM")
    return out


def _world_options(inp: _Inputs) -> list[int]:
    per = max(1, inp.ranks_per_node if inp.world > 1 else 8)
    opts = sorted({w for w in [2, 4, 8] if w <= per} | {per * k for k in (1, 2, 4, 8, 16, 32, 64, 128)})
    return [w for w in opts if w > inp.world]


def _suggest(inp: _Inputs, stage: str, active: set[str]) -> list[str]:
    """What would make `stage` fit, each as overrides; cheapest changes first."""
    def fits(i: _Inputs) -> Optional[StagePlan]:
        sp = _plan_stage(i, stage, active)
        return sp if sp.fits else None

    out = []
    given = [(k, c) for k, c in inp.constraints if k[0] == stage and c.given()]
    free = dataclasses.replace(inp, constraints=tuple((k, _Constraint()) for k, _ in inp.constraints))
    if given:
        sp = fits(free)
        if sp:
            keys = ", ".join(_setting_key(*k, f) for k, c in given for f in c.given())
            layout = "; ".join(f"{r.role}: {r.strategy.label()}" if r.trained else
                               f"{r.role}: {'offloaded' if r.strategy.offload else 'on the device'}"
                               for r in sp.roles if r.trained or r.role in ("ref", "reward"))
            out.append(f"leave {keys} to the planner: it would choose {layout} ({sp.peak_gib:.1f} GiB)")
    for w in _world_options(free):
        per = free.ranks_per_node if free.world > 1 or inp.device == "cpu" else min(w, 8)
        i = dataclasses.replace(free, world=w, ranks_per_node=per)
        if fits(i):
            nodes = max(1, w // per)
            how = (f"+deployment=single_node deployment.procs_per_node={per}" if nodes == 1 else
                   f"+deployment=multi_node deployment.nodes={nodes} deployment.procs_per_node={per}")
            out.append(f"{w} devices (e.g. {how}) with the planner choosing the layout")
            break
    # smaller batch (keeps the global batch with gradient accumulation where there is one)
    fields = _BATCH_FIELD[stage]
    b = getattr(free, fields[0])
    while b > 1:
        b //= 2
        i = dataclasses.replace(free, **{f: max(1, min(getattr(free, f), b)) for f in fields})
        if fits(i):
            keys = " ".join(f"{k}={max(1, min(getattr(free, f), b))}" for k, f in zip(_BATCH_KEY[stage], fields))
            extra = "" if stage == "ppo" else f" (raise stage.{stage}.gradient_accumulation_steps to keep the global batch)"
            out.append(f"{keys}{extra}")
            break
    if not out or all("devices" in s for s in out):
        for total in (512, 256):
            if total < free.prompt_len + free.answer_len:
                half = total // 2
                i = dataclasses.replace(free, prompt_len=min(free.prompt_len, half),
                                        answer_len=min(free.answer_len, half), new_tokens=min(free.new_tokens, half))
                if fits(i):
                    out.append(f"data_blend.max_prompt_len={i.prompt_len} data_blend.max_answer_len={i.answer_len}"
                               + (f" stage.ppo.generation.max_new_tokens={i.new_tokens}" if stage == "ppo" else ""))
                    break
    if inp.device == "cuda":
        from pipeline.hardware import load_profile, profile_names

        for name in sorted(profile_names(), key=lambda n: load_profile(n)["memory_gib"]):
            prof = load_profile(name)
            if prof["device"] != "cuda" or prof["memory_gib"] <= inp.memory_gib:
                continue
            i = dataclasses.replace(free, memory_gib=float(prof["memory_gib"]),
                                    dtype=inp.dtype if prof["bf16"] or inp.dtype != "bf16" else "fp16")
            if fits(i):
                out.append(f"hardware={name} ({prof['memory_gib']} GiB per GPU)")
                break
    if not out:  # a bigger change: more devices and batch 1 (and, on CPU, one process per node)
        for w in _world_options(free)[-4:]:
            per = 1 if inp.device == "cpu" else min(w, 8)
            i = dataclasses.replace(free, world=w, ranks_per_node=per,
                                    **{f: 1 for f in _BATCH_FIELD[stage]})
            if fits(i):
                out.append(f"{w} devices ({max(1, w // per)} nodes x {per}) and "
                           + " ".join(f"{k}=1" for k in _BATCH_KEY[stage]))
                break
    if not out:
        out.append("nothing tried fits: use more devices with ZeRO-3 + offload, LoRA, and shorter sequences")
    return [f"{stage}: {s}" for s in out]


# =========================================================================== entry points


def plan_run(cfg: Any) -> Plan:
    """Plan every stage for `cfg` (RunConfig). Pure arithmetic: no weights, no deepspeed."""
    inp = _inputs(cfg)
    active = set(cfg.run.stages)
    stages = _plan_stages(inp, active)
    warnings = _explicit_warnings(inp)
    p = cfg.stage.ppo
    if not p.enable_ema and p.ema_beta != type(p).ema_beta:
        warnings.append(f"stage.ppo.ema_beta={p.ema_beta} has no effect: the EMA is off (stage.ppo.enable_ema=false)")
    for name, spec in (("model.actor", inp.actor), ("model.reward", inp.reward)):
        if spec is None:
            warnings.append(f"{name}: size unknown (not in the catalog or local cache); the planner "
                            f"cannot check memory and chose a conservative layout")
    if inp.actor is not None and inp.reward is not None and _other_tokenizer(inp.actor, inp.reward):
        warnings.append(
            f"model.reward={inp.reward_name} ({inp.reward.family}, vocabulary {inp.reward.vocab_size}) and "
            f"model.actor={inp.actor_name} ({inp.actor.family}, vocabulary {inp.actor.vocab_size}) look pretrained "
            f"with different tokenizers; every model here "
            f"uses one tokenizer (model.tokenizer, default the actor's: the critic scores the actor's tokens), so the "
            f"reward model's embeddings start out meaning other tokens and step 2 must re-learn them: prefer a "
            f"reward model of the actor's family")
    suggestions: list[str] = []
    for name, sp in stages.items():
        if sp.fits:
            continue
        explicit = [_setting_key(name, r.role, k) for r in sp.roles for k in r.explicit]
        if name == "ppo" and inp.gather_weights is not None:
            explicit.append("stage.ppo.generation.gather_weights")
        who = f" with your settings ({', '.join(explicit)})" if explicit else ""
        msg = (f"stage {name}{who} will not fit: predicted {sp.peak_gib:.1f} GiB per device > "
               f"{sp.usable_gib:.1f} GiB usable of {sp.device_gib:.1f} GiB ({HEADROOM:.0%} headroom, "
               f"{OVERHEAD_GIB.get(inp.device, 1.0)} GiB runtime overhead)")
        if sp.host_gib > inp.host_gib_per_rank:
            msg += f"; offload needs {sp.host_gib:.0f} GiB host RAM per rank (~{inp.host_gib_per_rank:.0f} available)"
        if not sp.active:
            msg += " (stage not in run.stages)"
        warnings.append(msg)
        if sp.active:
            suggestions += _suggest(inp, name, active)
    return Plan(hardware=cfg.hardware.name, device=inp.device, world_size=inp.world, dtype=inp.dtype,
                stages=stages, warnings=warnings, suggestions=suggestions)


def _other_tokenizer(a: ModelSpec, b: ModelSpec) -> bool:
    """Another model family, or vocabularies apart by more than padding (LLaMA-2 32000 vs LLaMA-3 128256;
    Qwen2.5 0.5B 151936 vs 7B 152064 is padding)."""
    return a.family != b.family or abs(a.vocab_size - b.vocab_size) > 0.01 * max(a.vocab_size, b.vocab_size)


def dry_run_report(cfg: Any, plan: Optional[Plan] = None) -> str:
    """Plan table + warnings + suggestions: what `run.dry_run=true` prints before exiting."""
    plan = plan or plan_run(cfg)
    lines = [
        f"Memory plan: hardware={plan.hardware} ({plan.device}, {cfg.hardware.memory_gib} GiB per device), "
        f"world size {plan.world_size}, dtype {plan.dtype}, actor {cfg.model.actor}, reward {cfg.model.reward}",
        "",
        plan.table(),
    ]
    if plan.stages["ppo"].phases:
        lines += ["", "PPO phases (GiB/device, peak = resident + the largest phase): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in plan.stages["ppo"].phases.items())]
    if plan.warnings:
        lines += ["", "Warnings:"] + [f"  - {w}" for w in plan.warnings]
    if plan.suggestions:
        lines += ["", "What would fit:"] + [f"  - {s}" for s in plan.suggestions]
    lines += ["", "Plan fits." if plan.fits else "Plan does NOT fit.", "(dry run: no weights were loaded)"]
    return "\n".join(lines)

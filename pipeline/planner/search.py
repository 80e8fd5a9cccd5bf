"""The layout search: from the config's settings (null = free) and the catalog's sizes, the fastest
layout that fits each stage (order of preference: see pipeline.planner), and what would fit when
nothing does."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, replace
from typing import Any, Optional

from pipeline.catalog import ModelSpec, UnknownModelError, fitted_vocab, resolve_model
from pipeline.config import FROZEN_ROLES, TRAINED_ROLES, RunConfig, at, role_key, tensor_parallel_refusal
from pipeline.planner.memory import (
    DEFAULT_LORA_DIM,
    DTYPE_BYTES,
    GIB,
    HEADROOM,
    HOST_RAM_PER_GPU_RAM,
    OVERHEAD_GIB,
    comm_buffer_bytes,
    forward_transient_bytes,
    frozen_state_bytes,
    kv_cache_bytes,
    lora_params,
    reward_params,
    tensor_parallel_params,
    trained_state_bytes,
    training_activation_bytes,
    training_transient_bytes,
)
from pipeline.planner.plan import RolePlan, StagePlan, Strategy

# Model families AutoTP was measured on here (OPT: name heuristics; LLaMA: the HF tp_plan). The planner
# chooses tensor parallelism only for these; a degree given for another family is kept, with a warning.
TP_FAMILIES = ("opt", "llama")


@dataclass(frozen=True)
class _Constraint:
    zero_stage: Optional[int] = None
    offload: Optional[bool] = None
    gradient_checkpointing: Optional[bool] = None
    lora_dim: Optional[int] = None
    tp_degree: Optional[int] = None

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
    dpo_batch: int = 1  # stage.dpo.per_device_train_batch_size (pairs: 2 x this many rows per forward)
    ppo_critic: bool = True  # stage.ppo.advantage_estimator=gae (the critic-free ones build no critic)
    ppo_reward_model: bool = True  # stage.ppo.reward=model (a reward function loads none)

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


def _spec(name: str, tokenizer_tokens: Optional[int]) -> Optional[ModelSpec]:
    """The model's numbers as it will be loaded: its embedding grown to hold the run's tokenizer."""
    try:
        spec = resolve_model(name)
    except UnknownModelError:
        return None
    return replace(spec, vocab_size=fitted_vocab(spec.vocab_size, tokenizer_tokens)) if tokenizer_tokens else spec


def _inputs(cfg: RunConfig) -> _Inputs:
    hw = cfg.hardware
    world = cfg.world_size
    per_node = cfg.ranks_per_node
    host = getattr(hw, "host_memory_gib", None)
    if host is None:
        host = hw.memory_gib if hw.device == "cpu" else HOST_RAM_PER_GPU_RAM * hw.memory_gib * max(1, hw.devices_per_node)
    cons = []
    for stage, role, key in TRAINED_ROLES:
        s, lora = at(cfg, key).strategy, at(cfg, key).lora
        cons.append(((stage, role), _Constraint(s.zero_stage, s.offload, s.gradient_checkpointing, lora.dim, s.tp_degree)))
    for stage, role, key in FROZEN_ROLES:
        cons.append(((stage, role), _Constraint(offload=at(cfg, key))))
    dropout = cfg.model.dropout
    from pipeline.models import tokenizer_size  # transformers: imported only when a plan is made

    tokens = tokenizer_size(cfg.tokenizer_source, cfg.model.trust_remote_code)
    return _Inputs(
        device=hw.device, memory_gib=float(hw.memory_gib), ranks_per_node=per_node, world=world,
        dtype=cfg.dtype, host_gib=float(host),
        dropout=bool(dropout is None or dropout > 0),
        actor=_spec(cfg.model.actor, tokens), reward=_spec(cfg.model.reward, tokens),
        actor_name=cfg.model.actor, reward_name=cfg.model.reward,
        sft_batch=cfg.stage.sft.per_device_train_batch_size, rm_batch=cfg.stage.rm.per_device_train_batch_size,
        ppo_gen_batch=cfg.stage.ppo.rows_per_generation_batch,
        ppo_train_batch=cfg.stage.ppo.per_device_training_batch_size,
        prompt_len=cfg.data_blend.max_prompt_len, answer_len=cfg.data_blend.max_answer_len,
        new_tokens=cfg.stage.ppo.generation.max_new_tokens, ema=cfg.stage.ppo.enable_ema,
        gather_weights=cfg.stage.ppo.generation.gather_weights,
        constraints=tuple(cons),
        dpo_batch=cfg.stage.dpo.per_device_train_batch_size,
        ppo_critic=cfg.stage.ppo.needs_critic, ppo_reward_model=cfg.stage.ppo.reward_model,
    )


def _offload_level(s: Strategy) -> int:
    return 0 if not s.offload else (2 if s.zero_stage >= 3 else 1)


def _tp_options(inp: _Inputs, c: _Constraint, specs: tuple, ema: bool = False) -> tuple[list[int], str]:
    """The tensor-parallel degrees a role may take (its stage's models `specs` share it), and why no
    degree above 1 is among them ("" when one is). A given degree is kept (validation has checked it);
    else divisors of a node's ranks that divide every model's heads, for the families AutoTP was
    measured on, without LoRA (AutoTP cannot split peft's layers) or the EMA."""
    if c.tp_degree is not None:
        return [c.tp_degree], "" if c.tp_degree > 1 else "tp_degree=1 is given"
    why = ("one rank per node" if inp.ranks_per_node == 1 else
           "LoRA is given (AutoTP cannot split peft's layers)" if c.lora_dim else
           "the EMA is on (stage.ppo.enable_ema)" if ema else
           next((f"AutoTP is not measured on {s.family} models here" for s in specs if s.family not in TP_FAMILIES), ""))
    if why:
        return [1], why
    options = [t for t in range(1, inp.ranks_per_node + 1) if inp.ranks_per_node % t == 0
               and not any(tensor_parallel_refusal("", t, "", s.num_heads, s.num_kv_heads) for s in specs)]
    return options, "" if len(options) > 1 else "no degree divides both the node's ranks and the models' heads"


def _candidates(inp: _Inputs, c: _Constraint, tps: Optional[list[int]] = None) -> list[Strategy]:
    """Training layouts allowed by the explicit settings, fastest first (see module docstring); tps:
    the tensor-parallel degrees allowed (_tp_options; default 1 unless given)."""
    tps = tps or [c.tp_degree or 1]
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
                    for tp in tps:
                        if not (lora and tp > 1):  # AutoTP cannot split peft's LoRA layers
                            out.append(Strategy(z, off, gc, lora, tp))
    out.sort(key=_rank)
    return out


def _rank(s: Strategy) -> tuple:
    """Where a training layout sits in the order of preference (see pipeline.planner): lower first."""
    return _offload_level(s), s.lora_dim > 0, s.gradient_checkpointing, s.tp_degree, s.zero_stage


@dataclass
class _RoleMem:
    state: float  # resident bytes on device
    host: float
    act: float  # training transient
    breakdown: dict[str, float]


@functools.lru_cache(maxsize=8192)
def _trained_mem(inp: _Inputs, spec: ModelSpec, s: Strategy, *, lm: bool, batch: int, seq: int) -> _RoleMem:
    base = tensor_parallel_params(spec, s.tp_degree, lm)  # this rank's shards under tensor parallelism
    adapters = lora_params(spec, s.lora_dim)
    n_params, n_train = base + adapters, (adapters if s.lora_dim > 0 else base)
    dp = max(1, inp.world // s.tp_degree)  # ZeRO partitions over the data-parallel ranks
    st = trained_state_bytes(n_params, n_train, inp.dtype, s.zero_stage, s.offload, dp)
    buf = comm_buffer_bytes(spec, n_params, n_train, inp.dtype, s.zero_stage, inp.world, True, s.tp_degree)
    act = training_activation_bytes(spec, batch, seq, inp.dtype, grad_ckpt=s.gradient_checkpointing,
                                    lm_head=lm, dropout=inp.dropout, tp=s.tp_degree)
    resident_buf, transient = training_transient_bytes(act, buf, s.zero_stage)
    state = st["params"] + st["grads"] + st["optimizer"] + resident_buf
    bd = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"], "buffers": buf,
          "activations": act}
    return _RoleMem(state, st["host"], transient, {k: v / GIB for k, v in bd.items()})


def _frozen_strategy(partner: Strategy, offload: bool) -> Strategy:
    """A frozen model's layout: ZeRO-3 when offloaded or when its trained partner runs ZeRO-3; split
    over the partner's tensor-parallel degree."""
    return Strategy(3 if offload or partner.zero_stage >= 3 else 0, offload, tp_degree=partner.tp_degree)


@functools.lru_cache(maxsize=8192)
def _frozen_mem(inp: _Inputs, spec: ModelSpec, layout: Strategy, *, lm: bool) -> _RoleMem:
    n = tensor_parallel_params(spec, layout.tp_degree, lm)
    st = frozen_state_bytes(n, inp.dtype, layout.zero_stage, layout.offload, max(1, inp.world // layout.tp_degree))
    buf = comm_buffer_bytes(spec, n, 0, inp.dtype, layout.zero_stage, inp.world, False,
                            layout.tp_degree) if layout.zero_stage >= 3 else 0.0
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
        c.tp_degree or 1,
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
    cands = _candidates(inp, c, _tp_options(inp, c, (spec,))[0])
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
    shared = inp.constraint("ppo", "actor").tp_degree or inp.constraint("ppo", "critic").tp_degree or 1
    for r in sp.roles:  # the stage's models share one tensor-parallel degree
        r.strategy = dataclasses.replace(r.strategy, tp_degree=shared)
    a, c = sp.role("actor").strategy, sp.role("critic").strategy
    if not inp.ppo_critic:
        sp.roles = [r for r in sp.roles if r.role != "critic"]
    frozen = [("ref", inp.actor_name, a)] + ([("reward", inp.reward_name, c)] if inp.ppo_reward_model else [])
    for role, name, partner in frozen:
        given = inp.constraint("ppo", role)
        offload = given.offload if given.offload is not None else (partner.offload and partner.zero_stage >= 3)
        sp.roles.append(RolePlan(role, name, 0, False, _frozen_strategy(partner, offload), 0.0, 0.0, {}, given.given()))
    if inp.ema:
        sp.roles.append(RolePlan("ema", inp.actor_name, 0, False,
                                 Strategy(3 if a.zero_stage >= 3 else 0, a.offload or sp.role("ref").strategy.offload),
                                 0.0, 0.0, {}))
    return sp


def _ppo_stage(inp: _Inputs, active: bool) -> StagePlan:
    """Step 3's layouts. A critic-free estimator has no critic and a reward function no reward model: their
    side of the search is then one empty layout, and the plan lists neither role."""
    if inp.actor is None or (inp.reward is None and (inp.ppo_critic or inp.ppo_reward_model)):
        return _ppo_unknown(inp, active)
    A, R = inp.actor, inp.reward or inp.actor  # R is not sized when neither critic nor reward model is built
    d = DTYPE_BYTES[inp.dtype]
    seq = inp.prompt_len + inp.new_tokens
    ca, cc = inp.constraint("ppo", "actor"), inp.constraint("ppo", "critic")
    cref, crew = inp.constraint("ppo", "ref"), inp.constraint("ppo", "reward")
    usable, host_cap = inp.usable_gib * GIB, inp.host_gib_per_rank * GIB

    n_actor, n_reward = A.num_params(), reward_params(R) if inp.ppo_reward_model else 0
    # The four models share one tensor-parallel degree (DeepSpeed holds one group per process).
    tps_a, why_a = _tp_options(inp, ca, (A, R), ema=inp.ema)
    tps_c, why_c = _tp_options(inp, cc, (A, R))
    tps = [t for t in tps_a if t in tps_c] or tps_a  # none in common: validation names the conflict

    def kv(tp: int) -> float:
        return kv_cache_bytes(A, inp.ppo_gen_batch, seq, inp.dtype, tp)

    def prefill(tp: int) -> float:
        return forward_transient_bytes(A, inp.ppo_gen_batch, inp.prompt_len, inp.dtype, lm_head=False, tp=tp) \
            + inp.ppo_gen_batch * A.vocab_size * (d + 8)

    def experience(tp: int) -> float:
        return max(forward_transient_bytes(A, inp.ppo_gen_batch, seq, inp.dtype, lm_head=True, tp=tp),
                   forward_transient_bytes(R, inp.ppo_gen_batch, seq, inp.dtype, lm_head=False, tp=tp)
                   if inp.ppo_critic or inp.ppo_reward_model else 0.0)

    def gen_bytes(a: Strategy, gather: bool) -> float:
        lora_extra = lora_params(A, a.lora_dim) * d
        # ZeRO-3 gathers this rank's shards (the whole actor at tp 1); the partition stays beside them.
        weights = tensor_parallel_params(A, a.tp_degree) * d + lora_extra if a.zero_stage >= 3 and gather else 0.0
        return weights + kv(a.tp_degree) + prefill(a.tp_degree)

    # A layout is an actor side (its layout, whole-actor gathering or not), the reference model's
    # offload (with the EMA's place) and a critic side (its layout, the reward model's offload),
    # ranked as the module docstring says: groups by costly levers, ZeRO stages within a group.
    actor_groups: dict[tuple, list] = {}
    for a in _candidates(inp, ca, tps):  # lower ZeRO stage first within a group
        am = _trained_mem(inp, A, a, lm=True, batch=inp.ppo_train_batch, seq=seq)
        frozen = {}
        for ref_off in _frozen_offload_options(inp, cref):
            frozen[ref_off] = {"ref": _frozen_mem(inp, A, _frozen_strategy(a, ref_off), lm=True)}
            if inp.ema:
                frozen[ref_off]["ema"] = _ema_mem(A, a, inp.world, a.offload or ref_off)
        for gather in _gather_options(a, inp.gather_weights):
            key = (not gather, *_rank(a)[:-1])  # the ZeRO stage (last) orders within the group
            transient = max(am.act, gen_bytes(a, gather), experience(a.tp_degree))
            actor_groups.setdefault(key, []).append((a, gather, am, frozen, transient))
    critic_groups: dict[int, dict[tuple, list]] = {}  # by tensor-parallel degree: the actor's
    nothing = _RoleMem(0.0, 0.0, 0.0, {})  # no critic / no reward model (critic-free, a reward function)
    for c in _candidates(inp, cc, tps) if inp.ppo_critic else [Strategy(tp_degree=tp) for tp in tps]:
        cm = _trained_mem(inp, R, c, lm=False, batch=inp.ppo_train_batch, seq=seq) if inp.ppo_critic else nothing
        for rew_off in _frozen_offload_options(inp, crew) if inp.ppo_reward_model else [False]:
            reward = _frozen_mem(inp, R, _frozen_strategy(c, rew_off), lm=False) if inp.ppo_reward_model else nothing
            side_c = (c, rew_off, {"critic": cm, "reward": reward})
            for ref_off in _frozen_offload_options(inp, cref):
                key = (_offload_level(c), c.lora_dim > 0, c.gradient_checkpointing, ref_off * n_actor + rew_off * n_reward)
                critic_groups.setdefault(c.tp_degree, {}).setdefault(key, []).append((ref_off, side_c))

    def memory(side_a, ref_off, side_c) -> dict[str, _RoleMem]:
        return {"actor": side_a[2], **side_a[3][ref_off], **side_c[2]}

    def layouts():
        for a_key in sorted(actor_groups):
            tp = actor_groups[a_key][0][0].tp_degree
            for c_key in sorted(critic_groups.get(tp, {})):
                for side_a in actor_groups[a_key]:
                    for ref_off, side_c in critic_groups[tp][c_key]:
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
    gen_a = gen_bytes(a, gather)
    phases = {"generation": gen_a, "experience": experience(a.tp_degree), "train": max(am.act, cm.act)}
    roles = [
        RolePlan("actor", inp.actor_name, n_actor, True, a, (am.state + transient) / GIB, am.host / GIB,
                 {**am.breakdown, "generation": gen_a / GIB}, ca.given()),
    ]
    if inp.ppo_critic:
        roles.append(RolePlan("critic", inp.reward_name, reward_params(R), True, c, (cm.state + cm.act) / GIB,
                              cm.host / GIB, cm.breakdown, cc.given()))
    frozen = [("ref", inp.actor_name, n_actor, ref_s, cref)]
    if inp.ppo_reward_model:
        frozen.append(("reward", inp.reward_name, n_reward, rew_s, crew))
    for role, name, n, layout, given in frozen:
        m = mems[role]
        roles.append(RolePlan(role, name, n, False, layout, m.state / GIB, m.host / GIB, m.breakdown, given.given()))
    if inp.ema:
        m = mems["ema"]
        averaged = lora_params(A, a.lora_dim) if a.lora_dim else n_actor
        roles.append(RolePlan("ema", inp.actor_name, averaged, False, Strategy(3 if a.zero_stage >= 3 else 0, m.host > 0), m.state / GIB,
                              m.host / GIB, m.breakdown))
    ph = {"resident": resident / GIB, **{k: v / GIB for k, v in phases.items()}}
    whole_gather = n_actor * d + kv(1) + prefill(1)
    generation = _generation_path(a, gather, gen_a, whole_gather, inp.usable_gib, why_a or why_c, n_actor,
                                  tensor_parallel_params(A, a.tp_degree))
    return StagePlan("ppo", roles, peak / GIB, inp.usable_gib, inp.device_gib, host / GIB, fit, active, ph,
                     generation_gathers_params=(gather if a.zero_stage >= 3 else None), generation=generation)


def _generation_path(a: Strategy, gather: bool, gen_bytes: float, whole_gather: float, usable_gib: float,
                     why_no_tp: str, n_actor: int, n_local: float) -> dict[str, str]:
    """How step 3 generates with the actor's layout `a` (path) and why (for the plan and the dry run):
    on the tensor-parallel shards, gathered once per call, module by module, or as it is."""
    tp, z3 = a.tp_degree, a.zero_stage >= 3
    whole = f"the whole actor gathered for generation would need {whole_gather / GIB:.1f} GiB per device"
    whole += f" (more than the {usable_gib:.1f} GiB usable)" if whole_gather / GIB > usable_gib else ""
    if tp > 1:
        how = ("its ZeRO-3 partitions of them gathered once per call" if z3 and gather else
               "its ZeRO-3 partitions of them fetched module by module at every decode step" if z3 else "no gather")
        return {"path": f"tensor-parallel (TP={tp}, the lowest degree that fits)",
                "why": f"each of the {tp} ranks of a node's group generates on its shards of the split layers "
                       f"({n_local / 1e9:.2f}B of the actor's {n_actor / 1e9:.2f}B parameters; {how}; "
                       f"{gen_bytes / GIB:.1f} GiB for generation), with 2 all-reduces of batch x hidden per layer "
                       f"per token inside the node; {whole}"}
    no_tp = f"; tensor parallelism is not possible here: {why_no_tp}" if why_no_tp else ""
    if z3 and gather:
        return {"path": "gathered (ZeRO-3 weights gathered once per generate call)",
                "why": f"the whole actor fits one device for the call ({gen_bytes / GIB:.1f} GiB of {usable_gib:.1f} usable)"}
    if z3:
        return {"path": "module by module (ZeRO-3 fetches every module at every decode step)",
                "why": f"{whole}{no_tp or '; no tensor-parallel layout fits either'}"}
    return {"path": f"direct (ZeRO-{a.zero_stage}: the actor's weights are whole on every device)",
            "why": "nothing to gather"}


def _dpo_stage(inp: _Inputs, active: bool) -> StagePlan:
    """The policy, trained on chosen and rejected answers in one forward (2 x batch rows of prompt +
    answer), beside its frozen reference (a no-grad forward over the same rows first, so the two
    transients do not overlap). Layouts are ranked as PPO's: the policy's offload level, LoRA and
    checkpointing, then the reference's offload (one host-to-device copy of its weights per step),
    then the policy's ZeRO stage."""
    if inp.actor is None:
        sp = _unknown_stage(inp, "dpo", active, [("actor", inp.actor_name, True)])
        policy, given = sp.role("actor").strategy, inp.constraint("dpo", "ref")
        offload = given.offload if given.offload is not None else (policy.offload and policy.zero_stage >= 3)
        sp.roles.append(RolePlan("ref", inp.actor_name, 0, False, _frozen_strategy(policy, offload), 0.0, 0.0, {},
                                 given.given()))
        return sp
    A, rows, seq = inp.actor, 2 * inp.dpo_batch, inp.prompt_len + inp.answer_len
    c, cref = inp.constraint("dpo", "actor"), inp.constraint("dpo", "ref")

    def reference_forward(tp: int) -> float:
        return forward_transient_bytes(A, rows, seq, inp.dtype, lm_head=True, tp=tp)

    layouts = []
    for a in _candidates(inp, c, _tp_options(inp, c, (A,))[0]):
        am = _trained_mem(inp, A, a, lm=True, batch=rows, seq=seq)
        for ref_off in _frozen_offload_options(inp, cref):
            rank = (*_rank(a)[:-1], ref_off, a.zero_stage)
            layouts.append((rank, a, am, ref_off, _frozen_mem(inp, A, _frozen_strategy(a, ref_off), lm=True)))
    layouts.sort(key=lambda layout: layout[0])

    def peak(layout) -> float:
        return layout[2].state + layout[4].state + max(layout[2].act, reference_forward(layout[1].tp_degree))

    def host(layout) -> float:
        return layout[2].host + layout[4].host

    chosen = next((x for x in layouts if peak(x) <= inp.usable_gib * GIB and host(x) <= inp.host_gib_per_rank * GIB), None)
    fits = chosen is not None
    if not fits:  # the layout with the smallest peak, reported as not fitting
        chosen = min(layouts, key=peak)
    _, a, am, ref_off, rm = chosen
    n = A.num_params()
    ref_fwd = reference_forward(a.tp_degree)
    roles = [RolePlan("actor", inp.actor_name, n, True, a, (am.state + am.act) / GIB, am.host / GIB, am.breakdown, c.given()),
             RolePlan("ref", inp.actor_name, n, False, _frozen_strategy(a, ref_off), (rm.state + ref_fwd) / GIB,
                      rm.host / GIB, rm.breakdown, cref.given())]
    phases = {"resident": (am.state + rm.state) / GIB, "reference forward": ref_fwd / GIB, "train": am.act / GIB}
    return StagePlan("dpo", roles, peak(chosen) / GIB, inp.usable_gib, inp.device_gib, host(chosen) / GIB, fits, active,
                     phases)


def _plan_stage(inp: _Inputs, stage: str, active: set[str]) -> StagePlan:
    full = inp.prompt_len + inp.answer_len
    if stage == "sft":
        return _single_stage(inp, "sft", "actor", inp.actor, inp.actor_name, lm=True, batch=inp.sft_batch,
                             seq=full, active="sft" in active)
    if stage == "rm":  # chosen and rejected go through the model in one forward: 2 x batch
        return _single_stage(inp, "rm", "reward", inp.reward, inp.reward_name, lm=False, batch=2 * inp.rm_batch,
                             seq=full, active="rm" in active)
    if stage == "dpo":
        return _dpo_stage(inp, "dpo" in active)
    return _ppo_stage(inp, "ppo" in active)


def _plan_stages(inp: _Inputs, active: set[str]) -> dict[str, StagePlan]:
    return {stage: _plan_stage(inp, stage, active) for stage in ("sft", "rm", "ppo", "dpo")}


_BATCH_KEY = {"sft": ["stage.sft.per_device_train_batch_size"], "rm": ["stage.rm.per_device_train_batch_size"],
              "ppo": ["stage.ppo.per_device_generation_batch_size", "stage.ppo.per_device_training_batch_size"],
              "dpo": ["stage.dpo.per_device_train_batch_size"]}
_BATCH_FIELD = {"sft": ["sft_batch"], "rm": ["rm_batch"], "ppo": ["ppo_gen_batch", "ppo_train_batch"],
                "dpo": ["dpo_batch"]}


def _setting_key(stage: str, role: str, name: str) -> str:
    """The config key of one layout setting (a _Constraint field) of a role."""
    frozen = {(s, r): key for s, r, key in FROZEN_ROLES}
    if (stage, role) in frozen:
        return frozen[(stage, role)]
    key = role_key(stage, role)
    return f"{key}.lora.dim" if name == "lora_dim" else f"{key}.strategy.{name}"


def _explicit_warnings(inp: _Inputs) -> list[str]:
    out = []
    for (stage, role), c in inp.constraints:
        if c.offload and c.zero_stage == 0:
            sk = _setting_key(stage, role, "zero_stage").rsplit(".", 1)[0]
            out.append(f"{sk}.offload=true has no effect with {sk}.zero_stage=0 (offload needs ZeRO >= 1)")
        if c.offload and inp.device == "cpu":
            out.append(f"{_setting_key(stage, role, 'offload')}=true on a CPU device only moves memory within the same RAM")
        spec = inp.reward if role in ("reward", "critic") else inp.actor
        if (c.tp_degree or 1) > 1 and spec is not None and spec.family not in TP_FAMILIES:
            out.append(f"{_setting_key(stage, role, 'tp_degree')}={c.tp_degree}: DeepSpeed AutoTP was measured here on "
                       f"{' and '.join(TP_FAMILIES)} models only, not on {spec.family} ({spec.name}); compare its first "
                       f"losses with a run at tp_degree=1")
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

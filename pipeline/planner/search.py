"""The layout search: from the config's settings (null = free) and the catalog's sizes, the fastest
layout that fits each stage (order of preference: see pipeline.planner), and what would fit when
nothing does."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.catalog import ModelSpec, UnknownModelError, resolve_model
from pipeline.config import FROZEN_ROLES, TRAINED_ROLES, RunConfig, at, role_key
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
    trained_state_bytes,
    training_activation_bytes,
)
from pipeline.planner.plan import RolePlan, StagePlan, Strategy


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
    dpo_batch: int = 1  # stage.dpo.per_device_train_batch_size (pairs: 2 x this many rows per forward)

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


def _inputs(cfg: RunConfig) -> _Inputs:
    hw = cfg.hardware
    world = cfg.world_size
    per_node = cfg.deployment.procs_per_node or (hw.devices_per_node if cfg.deployment.launcher != "in_process" else 1)
    per_node = max(1, min(per_node, world))
    host = getattr(hw, "host_memory_gib", None)
    if host is None:
        host = hw.memory_gib if hw.device == "cpu" else HOST_RAM_PER_GPU_RAM * hw.memory_gib * max(1, hw.devices_per_node)
    cons = []
    for stage, role, key in TRAINED_ROLES:
        s, lora = at(cfg, key).strategy, at(cfg, key).lora
        cons.append(((stage, role), _Constraint(s.zero_stage, s.offload, s.gradient_checkpointing, lora.dim)))
    for stage, role, key in FROZEN_ROLES:
        cons.append(((stage, role), _Constraint(offload=at(cfg, key))))
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
        dpo_batch=cfg.stage.dpo.per_device_train_batch_size,
    )


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
    reference_forward = forward_transient_bytes(A, rows, seq, inp.dtype, lm_head=True)
    layouts = []
    for a in _candidates(inp, c):
        am = _trained_mem(inp, A, a, lm=True, batch=rows, seq=seq)
        for ref_off in _frozen_offload_options(inp, cref):
            rank = (_offload_level(a), a.lora_dim > 0, a.gradient_checkpointing, ref_off, a.zero_stage)
            layouts.append((rank, a, am, ref_off, _frozen_mem(inp, A, _frozen_strategy(a, ref_off), lm=True)))
    layouts.sort(key=lambda layout: layout[0])

    def peak(layout) -> float:
        return layout[2].state + layout[4].state + max(layout[2].act, reference_forward)

    def host(layout) -> float:
        return layout[2].host + layout[4].host

    chosen = next((x for x in layouts if peak(x) <= inp.usable_gib * GIB and host(x) <= inp.host_gib_per_rank * GIB), None)
    fits = chosen is not None
    if not fits:  # the layout with the smallest peak, reported as not fitting
        chosen = min(layouts, key=peak)
    _, a, am, ref_off, rm = chosen
    n = A.num_params()
    roles = [RolePlan("actor", inp.actor_name, n, True, a, (am.state + am.act) / GIB, am.host / GIB, am.breakdown, c.given()),
             RolePlan("ref", inp.actor_name, n, False, _frozen_strategy(a, ref_off), (rm.state + reference_forward) / GIB,
                      rm.host / GIB, rm.breakdown, cref.given())]
    phases = {"resident": (am.state + rm.state) / GIB, "reference forward": reference_forward / GIB, "train": am.act / GIB}
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

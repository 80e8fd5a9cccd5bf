"""Memory planner: per stage and role, the fastest layout that fits the hardware.

Pure arithmetic from the model catalog and the config: loads no weights, imports no deepspeed
or torch. `plan_run(cfg)` returns a `Plan`; `Plan.apply(cfg)` fills the strategy fields the user
left null; `dry_run_report(cfg)` is what `run.dry_run=true` prints.

- memory.py: the memory model (bytes per role and layout; formulas with their sources)
- search.py: the candidates, the search per stage, warnings and suggestions
- plan.py: the plan as data (Strategy, RolePlan, StagePlan, Plan) and its rendering

Order of preference (fastest first; the first that fits wins)
-------------------------------------------------------------
1. ZeRO-0 < ZeRO-1 < ZeRO-2 < ZeRO-3: each stage adds communication (ZeRO-3 re-gathers weights
   every forward and backward, 1.5x the traffic of data parallelism), so the least sharding
   that fits is the fastest.
2. + tensor parallelism (DeepSpeed AutoTP), degree 2, 4, ... up to a node's ranks, each with ZeRO
   0 < 1 < 2 < 3 again: the lowest degree that fits. Its cost, per layer of every micro-batch: 2
   all-reduces of b*s*h in the forward and one per column-parallel Linear (4 for OPT, 5 for LLaMA)
   in the backward, blocking (nothing overlaps them), plus matmuls t times narrower. ZeRO-3's cost is
   re-gathering the weights every forward and backward: per micro-batch ~3*P*d bytes (gather, gather,
   reduce-scatter) against TP's ~(2 + 4) * 2(t-1)/t * L*b*s*h*d; with P ~ 12*L*h^2 that is ~3h/(b*s)
   times more than TP's, so below ~3h tokens per micro-batch (15k for OPT-13B) ZeRO-3 moves more
   bytes. TP still ranks after ZeRO-3 because it changes what a step is: the t ranks of a group
   share one batch, so a step takes t times fewer examples (data parallelism over world / t; raise
   gradient_accumulation_steps by t to keep the global batch); and because its all-reduces need a
   node's links (NVLink, ~10x a node's network per GPU), it stays inside a node. It divides what
   ZeRO cannot: activations (all but the layer inputs) and the KV cache. In PPO generation the
   balance turns: an actor too large to gather on one device would otherwise fetch every module at
   every decode step (P*d bytes per token), where a TP-split actor generates on its resident shards
   with 2 all-reduces of b*h per layer per token (see the PPO order below). Not with LoRA (AutoTP
   cannot split peft's layers) or the PPO EMA; the degree must divide the models' heads.
3. + gradient checkpointing: one extra forward per step (~33% more compute) but no extra traffic.
4. + LoRA: fewer gradients and optimizer states and a cheaper backward, but it changes what is
   learned; DeepSpeed-Chat's own single-GPU presets use it (dim 128), and it still beats offload
   on speed.
5. + optimizer offload (ZeRO 1/2 + offload): Adam on the CPU and gradients over PCIe every step.
6. + parameter offload (ZeRO-3 + offload): weights over PCIe every forward and backward too.
Within an offload level: full fine-tuning before LoRA, then no checkpointing before checkpointing,
then the lower tensor-parallel degree, then the lower ZeRO stage first. For PPO, layouts are ranked
by, in this order:
  1. the actor (the larger model, which also generates): generation with no per-token fetching
     (the actor's own weights, its tensor-parallel shards, or the ZeRO-3 actor gathered once per
     call) before module-by-module fetching (which re-gathers every module per token), then its
     offload level, LoRA, checkpointing and tensor-parallel degree as above;
  2. the critic's offload level, LoRA and checkpointing;
  3. offloading the frozen reference and reward models (fewest bytes first): one host-to-device
     copy of their weights per experience batch, no extra compute, so it beats any lever above;
     never chosen on a CPU device;
  4. the actor's ZeRO stage, then the critic's: the cheapest levers, so they are raised first.
The four PPO models share one tensor-parallel degree (DeepSpeed keeps one group per process: the
critic takes the actor's, the frozen models their partner's); so do DPO's policy and reference.
DPO (a trained policy beside its frozen reference, chosen and rejected answers in one forward of
2 x batch rows) is ranked the same way: the policy's offload level, LoRA, checkpointing and
tensor-parallel degree, then offloading the reference, then the policy's ZeRO stage.
Explicit user settings always win: they filter the
candidates, and when none of the remaining ones fits the planner warns and suggests what would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pipeline.catalog import ModelSpec
from pipeline.config import RunConfig
from pipeline.planner.memory import (
    DTYPE_BYTES,
    GIB,
    HEADROOM,
    OVERHEAD_GIB,
    comm_buffer_bytes,
    forward_transient_bytes,
    frozen_state_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    layer_params,
    lora_params,
    reward_params,
    tensor_parallel_params,
    tensor_parallel_split,
    trained_state_bytes,
    training_activation_bytes,
    training_transient_bytes,
)
from pipeline.planner.plan import Plan, RolePlan, StagePlan, Strategy
from pipeline.planner.search import (
    _candidates,
    _Constraint,
    _explicit_warnings,
    _inputs,
    _offload_level,
    _plan_stages,
    _setting_key,
    _suggest,
    _tp_options,
)

__all__ = ["DTYPE_BYTES", "GIB", "HEADROOM", "OVERHEAD_GIB", "Plan", "RolePlan", "StagePlan", "Strategy",
           "comm_buffer_bytes", "dry_run_report", "forward_transient_bytes", "frozen_state_bytes", "kv_cache_bytes",
           "layer_activation_bytes", "layer_params", "lora_params", "plan_run", "reward_params",
           "tensor_parallel_params", "tensor_parallel_split", "trained_state_bytes", "training_activation_bytes",
           "training_transient_bytes",
           "_candidates", "_Constraint", "_inputs", "_offload_level", "_tp_options"]


def plan_run(cfg: RunConfig) -> Plan:
    """Plan every stage for `cfg` (RunConfig). Pure arithmetic: no weights, no deepspeed."""
    inp = _inputs(cfg)
    active = set(cfg.run.stages)
    stages = _plan_stages(inp, active)
    warnings = _explicit_warnings(inp)
    p = cfg.stage.ppo
    if not p.enable_ema and p.ema_beta != type(p).ema_beta:
        warnings.append(f"stage.ppo.ema_beta={p.ema_beta} has no effect: the EMA is off (stage.ppo.enable_ema=false)")
    reward_used = bool(active & {"rm", "ppo"})  # a [sft, dpo] run loads no reward model
    for name, spec in [("model.actor", inp.actor)] + ([("model.reward", inp.reward)] if reward_used else []):
        if spec is None:
            warnings.append(f"{name}: size unknown (not in the catalog or local cache); the planner "
                            f"cannot check memory and chose a conservative layout")
    if reward_used and inp.actor is not None and inp.reward is not None and _other_tokenizer(inp.actor, inp.reward):
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
    """Folders saved with different tokenizers; for models without one saved beside them: another model
    family, or vocabularies apart by more than padding (LLaMA-2 32000 vs LLaMA-3 128256; Qwen2.5 0.5B
    151936 vs 7B 152064 is padding)."""
    saved_a, saved_b = _saved_tokenizer(a.source), _saved_tokenizer(b.source)
    if saved_a and saved_b:
        return saved_a != saved_b
    return a.family != b.family or abs(a.vocab_size - b.vocab_size) > 0.01 * max(a.vocab_size, b.vocab_size)


def _saved_tokenizer(source: str) -> Optional[str]:
    """The vocabulary saved in a local model folder, as text to compare (tokenizer.json's model and added
    tokens, whatever formatting the writer used; else the slow tokenizers' files); None when it has none."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    if (folder / "tokenizer.json").is_file():
        saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return json.dumps([saved.get("model"), saved.get("added_tokens")], sort_keys=True)
    for names in (("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",)):
        if all((folder / name).is_file() for name in names):
            return "".join((folder / name).read_bytes().hex() for name in names)
    return None


def dry_run_report(cfg: RunConfig, plan: Optional[Plan] = None) -> str:
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
    generation = plan.stages["ppo"].generation
    if generation and plan.stages["ppo"].active:
        lines += ["", f"PPO generation: {generation['path']}: {generation['why']}"]
    split = [(name, sp.roles[0].strategy.tp_degree) for name, sp in plan.stages.items()
             if sp.active and sp.roles and sp.roles[0].strategy.tp_degree > 1]
    if split:
        lines += ["", "Tensor parallelism: " + "; ".join(
            f"{name} TP={tp} (groups of {tp} consecutive ranks in a node share one batch: {plan.world_size // tp} "
            f"data-parallel replica{'s' if plan.world_size // tp != 1 else ''} of {plan.world_size} ranks, so a step "
            f"takes {tp}x fewer examples than the same batch settings without TP)" for name, tp in split)]
    if plan.stages["dpo"].active:
        lines += ["", "DPO phases (GiB/device, peak = resident + the larger phase): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in plan.stages["dpo"].phases.items())]
    if plan.warnings:
        lines += ["", "Warnings:"] + [f"  - {w}" for w in plan.warnings]
    if plan.suggestions:
        lines += ["", "What would fit:"] + [f"  - {s}" for s in plan.suggestions]
    lines += ["", "Plan fits." if plan.fits else "Plan does NOT fit.", "(dry run: no weights were loaded)"]
    return "\n".join(lines)

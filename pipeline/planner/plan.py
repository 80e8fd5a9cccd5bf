"""What the planner decides, as data: a Strategy per role, its memory, per stage; and how it is
shown (the table printed before a run, plan.json / plan.txt, the dry-run report)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config import FROZEN_ROLES, TRAINED_ROLES, RunConfig, at
from pipeline.planner.memory import HEADROOM


@dataclass(frozen=True)
class Strategy:
    zero_stage: int = 0
    offload: bool = False
    gradient_checkpointing: bool = False
    lora_dim: int = 0
    tp_degree: int = 1

    def label(self) -> str:
        return (f"ZeRO-{self.zero_stage}{f' +TP{self.tp_degree}' if self.tp_degree > 1 else ''}"
                f"{' +offload' if self.offload else ''}"
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
    # PPO: how the actor generates ({"path", "why"}: tensor-parallel, gathered, module by module, direct).
    generation: dict[str, str] = field(default_factory=dict)

    def role(self, name: str) -> RolePlan:
        return next(r for r in self.roles if r.role == name)

    def has(self, name: str) -> bool:
        return any(r.role == name for r in self.roles)


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

    def apply(self, cfg: RunConfig) -> None:
        """Fill the strategy and LoRA fields the user left null (explicit values stay)."""
        for stage, role, key in TRAINED_ROLES:
            if not self.stages[stage].has(role):  # a model the run does not build (no critic)
                continue
            chosen = self.stages[stage].role(role).strategy
            section = at(cfg, key)
            for name in ("zero_stage", "offload", "gradient_checkpointing", "tp_degree"):
                if getattr(section.strategy, name) is None:
                    setattr(section.strategy, name, getattr(chosen, name))
            if section.lora.dim is None:
                section.lora.dim = chosen.lora_dim
        for stage, role, key in FROZEN_ROLES:
            parent, name = key.rsplit(".", 1)
            if getattr(at(cfg, parent), name) is None and self.stages[stage].has(role):
                setattr(at(cfg, parent), name, self.stages[stage].role(role).strategy.offload)
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
                "generation": dict(sp.generation),
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

    def save(self, run_dir: str | Path) -> None:
        """Write <run_dir>/plan.json (to_dict) and <run_dir>/plan.txt (the table and notes)."""
        out = Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        from pipeline.files import atomic_write, write_json_atomic

        write_json_atomic(out / "plan.json", self.to_dict())
        notes = [self.table()] + [f"warning: {w}" for w in self.warnings] + [f"would fit: {x}" for x in self.suggestions]
        atomic_write(out / "plan.txt", "\n".join(notes) + "\n")

    def table(self) -> str:
        head = ["stage", "role", "model", "params", "ZeRO", "offload", "LoRA", "grad ckpt", "TP",
                "GiB/device", "device GiB", "fits?"]
        rows = []
        for name, sp in self.stages.items():
            for r in sp.roles:
                s = r.strategy
                rows.append([name if sp.active else f"({name})", r.role, r.model, _fmt_params(r.params),
                             str(s.zero_stage), "yes" if s.offload else "no", str(s.lora_dim) if s.lora_dim else "-",
                             "yes" if s.gradient_checkpointing else "no", str(s.tp_degree),
                             f"{r.device_gib:.1f}", "", ""])
            rows.append([name if sp.active else f"({name})", "= peak", "", "", "", "", "", "", "",
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

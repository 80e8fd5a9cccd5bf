"""Schema of the `data_blend` config group (part of the one typed config in pipeline.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

@dataclass
class DatasetSpec:
    # Adapter name: builtin, hh-rlhf, local, or a hub id such as Dahoas/rm-static.
    name: str = "builtin"
    # Local file or folder; null = the hub id in `name`.
    path: Optional[str] = None
    # Sampling proportion within the blend (relative to the other datasets).
    weight: float = 1.0
    # Local-file field mapping: prompt/chosen/rejected columns, or answer_a/answer_b/label, or messages.
    fields: dict[str, str] = field(default_factory=dict)
    # Records to generate (builtin) or to read at most (others); null = all.
    max_records: Optional[int] = None


@dataclass
class DataBlendSection:
    name: str = "builtin"
    # Convenience for single-file blends: data_blend.path=FILE fills datasets' path via interpolation.
    path: Optional[str] = None
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    # Extra prompt/answer sets used only by SFT.
    sft_only: list[DatasetSpec] = field(default_factory=list)
    # Share of every dataset given to sft,rm,ppo (disjoint, deterministic for the seed).
    split: str = "2,4,4"
    # Share of each stage's slice held out for evaluation.
    eval_fraction: float = 0.1
    # human_assistant ("Human: ... Assistant:") or chat_template (the tokenizer's).
    prompt_format: str = "human_assistant"
    max_prompt_len: int = 256
    max_answer_len: int = 256
    # Processed-data cache; null = <output_dir>/data_cache.
    cache_dir: Optional[str] = None
    # Text corpus for PPO's mixed (PTX) loss; null = no mixed training.
    ptx_path: Optional[str] = None


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value} {why}")


def validate_data_blend(d: DataBlendSection) -> None:
    """Raise ValueError naming the data_blend key that is wrong."""
    parts = d.split.split(",")
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    _require(len(shares) == 3 and all(s >= 0 for s in shares) and sum(shares) > 0,
           "data_blend.split", d.split, "must be three non-negative numbers like 2,4,4 (sft,rm,ppo)")
    _require(len(d.datasets) > 0, "data_blend.datasets", "[]", "is empty; list at least one dataset")
    for i, ds in enumerate(d.datasets + d.sft_only):
        _require(ds.weight > 0, f"data_blend.datasets[{i}].weight", ds.weight, "must be > 0")
    _require(0.0 < d.eval_fraction < 1.0, "data_blend.eval_fraction", d.eval_fraction, "must be in (0, 1)")
    _require(d.prompt_format in ("human_assistant", "chat_template"), "data_blend.prompt_format",
           d.prompt_format, "must be human_assistant or chat_template")
    _require(d.max_prompt_len > 0, "data_blend.max_prompt_len", d.max_prompt_len, "must be > 0")
    _require(d.max_answer_len > 0, "data_blend.max_answer_len", d.max_answer_len, "must be > 0")

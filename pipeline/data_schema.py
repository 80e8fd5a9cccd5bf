"""Schema of the `data_blend` config group (part of the one typed config in pipeline.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DatasetSpec:
    # Adapter name: builtin, hh-rlhf, local, or a hub id such as Dahoas/rm-static
    # (see pipeline.data.sources.ADAPTERS). Any other name with a path reads it as `local`.
    name: str = "builtin"
    # Local file or folder (jsonl/json[.gz], parquet, csv, arrow, or a save_to_disk folder);
    # null = the hub id in `name` (from the hub or the local datasets cache).
    path: Optional[str] = None
    # Sampling proportion in the blend's train sets, relative to the other datasets' weights.
    # null (every dataset) = use every example once, in natural proportions. Either all or none set.
    weight: Optional[float] = None
    # Field mapping for `local` files; null values are ignored; empty = auto-detect. Keys:
    #   prompt, chosen, rejected          direct columns (prompt may be a message list; chosen/
    #                                     rejected may be full conversations ending in the answer)
    #   answer_a, answer_b, label, a_wins, b_wins, tie
    #                                     two answers + a column saying which won: a label equal
    #                                     to a_wins (default "0") or "a" means answer_a won,
    #                                     b_wins (default "1") or "b" answer_b; a label equal to
    #                                     tie or "tie" is dropped and counted as "tie"; any other
    #                                     label stops the run (see on_unmapped_label)
    #   messages (+ optional rejected)    a conversation; its last assistant turn is the chosen answer
    fields: dict[str, Optional[str]] = field(default_factory=dict)
    # A preference label that is neither fields.a_wins, fields.b_wins nor fields.tie: "error"
    # stops the run naming the value, file and line (a mapping that does not match the data
    # would otherwise drop or flip rows silently); "drop" drops such rows as "unmapped label".
    on_unmapped_label: str = "error"
    # Records to generate (builtin) or to read at most per pool, train and eval (others); null = all.
    max_records: Optional[int] = None


@dataclass
class DataBlendSection:
    name: str = "builtin"
    # Convenience for single-file blends: data_blend.path=FILE fills datasets' path via interpolation.
    path: Optional[str] = None
    # Convenience for the `local` preset: data_blend.fields.prompt=question fills datasets[0].fields.
    fields: dict[str, Optional[str]] = field(default_factory=dict)
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    # Extra prompt/answer sets used only by SFT (all of each goes to SFT; not split between stages).
    sft_only: list[DatasetSpec] = field(default_factory=list)
    # Share of every dataset given to sft,rm,ppo (disjoint, deterministic for the seed).
    split: str = "2,4,4"
    # Share of each stage's slice held out for evaluation (when the source has no eval split).
    eval_fraction: float = 0.1
    # human_assistant ("Human: ... Assistant:") or chat_template (the tokenizer's).
    prompt_format: str = "human_assistant"
    # Prompts longer than this (in tokens) are dropped and counted; answers are cut to max_answer_len.
    max_prompt_len: int = 256
    max_answer_len: int = 256
    # Processed-data cache; null = <output_dir>/data_cache.
    cache_dir: Optional[str] = None
    # Text corpus for PPO's mixed (PTX) loss: a .txt file or folder, a json/jsonl/parquet/csv file
    # with a text column, or a hub id; null = no mixed training.
    ptx_path: Optional[str] = None
    # Column holding the text when ptx_path is a table or a hub dataset.
    ptx_field: str = "text"
    # Cap on PTX blocks (null = all).
    ptx_max_blocks: Optional[int] = None


FIELD_KEYS = ("prompt", "chosen", "rejected", "answer_a", "answer_b", "label", "a_wins", "b_wins", "tie", "messages")


def label_values(fields: dict) -> tuple[set[str], set[str], set[str]]:
    """The label texts (lower case) meaning A won, B won, and a tie, from a field mapping."""
    a_wins = {str(fields.get("a_wins") or "0").lower(), "a", "answer_a"}
    b_wins = {str(fields.get("b_wins") or "1").lower(), "b", "answer_b"}
    tie = {"tie"} | ({str(fields["tie"]).lower()} if fields.get("tie") is not None else set())
    return a_wins, b_wins, tie


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
    for group in ("datasets", "sft_only"):
        specs = getattr(d, group)
        for i, ds in enumerate(specs):
            _require(ds.weight is None or ds.weight > 0, f"data_blend.{group}[{i}].weight", ds.weight, "must be > 0")
            _require(ds.max_records is None or ds.max_records > 0, f"data_blend.{group}[{i}].max_records",
                     ds.max_records, "must be > 0 or null")
            _require(ds.on_unmapped_label in ("error", "drop"), f"data_blend.{group}[{i}].on_unmapped_label",
                     ds.on_unmapped_label, "must be error or drop")
            _validate_fields(ds.fields or {}, f"data_blend.{group}[{i}].fields")
    every = d.datasets + d.sft_only
    weighted = [ds.weight is not None for ds in every]
    if any(weighted) and not all(weighted):
        i = weighted.index(False)
        group, j = ("datasets", i) if i < len(d.datasets) else ("sft_only", i - len(d.datasets))
        raise ValueError(f"data_blend.{group}[{j}].weight=null but other datasets have weights; "
                         "give every dataset a weight, or none")
    _require(0.0 < d.eval_fraction < 1.0, "data_blend.eval_fraction", d.eval_fraction, "must be in (0, 1)")
    _require(d.prompt_format in ("human_assistant", "chat_template"), "data_blend.prompt_format",
             d.prompt_format, "must be human_assistant or chat_template")
    _require(d.max_prompt_len > 0, "data_blend.max_prompt_len", d.max_prompt_len, "must be > 0")
    _require(d.max_answer_len > 1, "data_blend.max_answer_len", d.max_answer_len, "must be > 1 (answer + eos)")
    _require(d.ptx_max_blocks is None or d.ptx_max_blocks > 0, "data_blend.ptx_max_blocks", d.ptx_max_blocks,
             "must be > 0 or null")


def _validate_fields(fields: dict, key: str) -> None:
    for name in fields:
        _require(name in FIELD_KEYS, f"{key}.{name}", fields[name], f"is not a field key; known: {', '.join(FIELD_KEYS)}")
    a_wins, b_wins, tie = label_values(fields)
    _require(not (a_wins & b_wins), f"{key}.b_wins", fields.get("b_wins"), "is also a value that means answer_a won")
    _require(not (tie & (a_wins | b_wins)), f"{key}.tie", fields.get("tie"),
             "is also a value that means a win; set fields.a_wins and fields.b_wins to the winning labels")

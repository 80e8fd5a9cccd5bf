"""Data layer: sources -> prompt/chosen/rejected records -> per-stage tokenized examples.

`load_stage_data(cfg, stage, tokenizer)` is the one entry point the stages call. Each
dataset is split between sft/rm/ppo by `data_blend.split` (disjoint, deterministic for the
seed), each stage's slice is split into train/eval, and the records are tokenized:

  sft: {"input_ids": prompt + answer + eos, "prompt_len": int}
  rm:  {"chosen_input_ids": ..., "rejected_input_ids": ..., "prompt_len": int}
  ppo: {"prompt_input_ids": ...}
"""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.data_schema import DatasetSpec

STAGE_INDEX = {"sft": 0, "rm": 1, "ppo": 2}


class DataError(ValueError):
    """Bad input data; the message names the file, line or field."""


@dataclass
class Record:
    """One example: the dialogue so far, and the answer(s) to it."""

    messages: list[dict[str, str]]  # [{"role": "user"|"assistant", "content": ...}], ends with a user turn
    chosen: str
    rejected: str | None = None


@dataclass
class SourceStats:
    name: str
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)


@dataclass
class StageData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    stats: list[SourceStats]

    def summary(self, stage: str) -> str:
        lines = [f"data for {stage}: {len(self.train)} train / {len(self.eval)} eval examples"]
        for s in self.stats:
            drops = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped.items())) or "none"
            lines.append(f"  {s.name}: read {s.read}, kept {s.kept}, dropped: {drops}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- sources


def _read_builtin(spec: DatasetSpec, seed: int) -> list[Record]:
    from pipeline.data.builtin import generate_pairs

    pairs = generate_pairs(spec.max_records or 4000, seed=seed)
    return [Record([{"role": "user", "content": p["prompt"]}], p["chosen"], p["rejected"]) for p in pairs]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _jsonl_rows(path: Path):
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg})") from None


def split_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    turns: list[dict[str, str]] = []
    for chunk in ("\n\n" + text.lstrip("\n")).split("\n\n"):
        if chunk.startswith("Human:"):
            turns.append({"role": "user", "content": chunk[len("Human:"):].strip()})
        elif chunk.startswith("Assistant:"):
            turns.append({"role": "assistant", "content": chunk[len("Assistant:"):].strip()})
        elif turns:  # a blank line inside a turn
            turns[-1]["content"] += "\n\n" + chunk
    return turns


def _read_hh_rlhf(spec: DatasetSpec, seed: int) -> list[Record]:
    if not spec.path:
        raise DataError("hh-rlhf needs a local file or folder: set data_blend.path=FILE_OR_DIR")
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise DataError(f"data_blend.path={spec.path}: no such file or folder")
    files = sorted(root.rglob("*.jsonl*")) if root.is_dir() else [root]
    records = []
    for path in files:
        for line_no, row in _jsonl_rows(path):
            for key in ("chosen", "rejected"):
                if key not in row:
                    raise DataError(f"{path}:{line_no}: record has no field {key!r} (hh-rlhf needs chosen and rejected)")
            cut = row["chosen"].rfind("\n\nAssistant:")
            cut_r = row["rejected"].rfind("\n\nAssistant:")
            if cut < 0 or cut_r < 0:
                raise DataError(f"{path}:{line_no}: no '\\n\\nAssistant:' turn in chosen/rejected")
            prompt = row["chosen"][: cut + len("\n\nAssistant:")]
            turns = split_dialogue(prompt[: -len("\n\nAssistant:")])
            records.append(Record(turns, row["chosen"][cut + len("\n\nAssistant:"):].strip(),
                                  row["rejected"][cut_r + len("\n\nAssistant:"):].strip()))
            if spec.max_records and len(records) >= spec.max_records:
                return records
    return records


ADAPTERS = {"builtin": _read_builtin, "hh-rlhf": _read_hh_rlhf}


def read_source(spec: DatasetSpec, seed: int) -> list[Record]:
    if spec.name not in ADAPTERS:
        raise DataError(f"unknown dataset {spec.name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[spec.name](spec, seed)


# --------------------------------------------------------------------------- splits and tokens


def split_indices(n: int, split: str, stage: str, seed: int, name: str) -> list[int]:
    """This stage's disjoint slice of a shuffled range(n); deterministic for (seed, name)."""
    shares = [float(x) for x in split.split(",")]
    order = list(range(n))
    random.Random(f"{seed}-{name}").shuffle(order)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    cut = [round(n * b / bounds[-1]) for b in bounds]
    i = STAGE_INDEX[stage]
    return order[cut[i]: cut[i + 1]]


def format_prompt(messages: list[dict[str, str]], tokenizer, prompt_format: str) -> str:
    if prompt_format == "chat_template":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def _encode(record: Record, tokenizer, cfg: RunConfig, stage: str, stats: SourceStats) -> dict | None:
    d = cfg.data_blend
    prompt_ids = tokenizer(format_prompt(record.messages, tokenizer, d.prompt_format)).input_ids
    if len(prompt_ids) > d.max_prompt_len:
        stats.dropped["prompt too long"] += 1
        return None
    if stage == "ppo":
        return {"prompt_input_ids": prompt_ids}

    def answer(text: str) -> list[int]:
        ids = tokenizer(" " + text, add_special_tokens=False).input_ids[: d.max_answer_len - 1]
        return ids + [tokenizer.eos_token_id]

    if stage == "sft":
        return {"input_ids": prompt_ids + answer(record.chosen), "prompt_len": len(prompt_ids)}
    if record.rejected is None:
        stats.dropped["no rejected answer"] += 1
        return None
    if record.chosen.strip() == record.rejected.strip():
        stats.dropped["chosen == rejected"] += 1
        return None
    return {"chosen_input_ids": prompt_ids + answer(record.chosen),
            "rejected_input_ids": prompt_ids + answer(record.rejected), "prompt_len": len(prompt_ids)}


def load_stage_data(cfg: RunConfig, stage: str, tokenizer) -> StageData:
    """Train and eval examples of `stage` from every dataset of the blend."""
    train: list[dict] = []
    evaluation: list[dict] = []
    all_stats = []
    for spec in cfg.data_blend.datasets:
        stats = SourceStats(spec.name)
        records = read_source(spec, cfg.run.seed)
        picked = split_indices(len(records), cfg.data_blend.split, stage, cfg.run.seed, spec.name)
        stats.read = len(picked)
        examples = [e for e in (_encode(records[i], tokenizer, cfg, stage, stats) for i in picked) if e is not None]
        stats.kept = len(examples)
        if not examples:
            raise DataError(f"dataset {spec.name!r} has no {stage} examples left: read {stats.read}, "
                            f"dropped {dict(stats.dropped)}")
        n_eval = max(1, round(len(examples) * cfg.data_blend.eval_fraction))
        evaluation += examples[:n_eval]
        train += examples[n_eval:]
        all_stats.append(stats)
    random.Random(cfg.run.seed).shuffle(train)
    return StageData(train, evaluation, all_stats)

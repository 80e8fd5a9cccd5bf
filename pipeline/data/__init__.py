"""Data layer: sources -> prompt/chosen/rejected records -> per-stage tokenized examples.

`load_stage_data(cfg, stage, tokenizer)` is the one entry point the stages call. Each
dataset is split between sft/rm/ppo by `data_blend.split` (disjoint, deterministic for the
seed and the dataset's name); each stage's slice is split into train/eval (or, when the
source has its own eval split, e.g. hub "test" or a local test file, that split's stage
slice is the eval set); records are tokenized (`Dataset.map`, in several processes for large
sets); the train sets are blended by weight:

  sft: {"input_ids": prompt + answer + eos, "prompt_len": int}
  rm:  {"chosen_input_ids": ..., "rejected_input_ids": ..., "prompt_len": int}
  ppo: {"prompt_input_ids": ..., "reference": str} (the source's answer, for reward functions)

Results are cached (Arrow, never pickle) under a hash of everything that shapes them;
see pipeline.data.cache. Every rank memory-maps the cached tables (`Examples`) instead of
holding the examples as Python objects: a node keeps one copy, in its page cache, and a batch
reads just its rows. `load_ptx_data` gives fixed-size text blocks for PPO's PTX loss, also
memory-mapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.data import pick
from pipeline.data.cache import build_or_load, file_fingerprint, key_of, tokenizer_fingerprint
from pipeline.data.sources import ADAPTERS, DataError, Record, SourceData, read_source, source_files, split_dialogue
from pipeline.data_schema import DatasetSpec

# Built-in generated sources whose records have changed since caches were written: name -> version.
GENERATOR_VERSIONS = {"builtin_pick": pick.VERSION}

__all__ = ["DataError", "Examples", "Record", "SourceStats", "StageData", "TextBlocks", "load_stage_data",
           "load_ptx_data", "split_indices", "format_prompt", "blend_counts", "read_source", "split_dialogue",
           "ADAPTERS", "cache_dir"]

STAGE_INDEX = {"sft": 0, "rm": 1, "ppo": 2}
# A stage that trains on another stage's slice: DPO learns from step 2's preference pairs (as DeepSpeed-Chat's).
SLICE_OF = {"dpo": "rm"}
# Tokenizing runs in one process below 2 x this many rows (starting a pool costs seconds), else in
# one process per this many rows, up to the usable cores and at most MAP_MAX_PROCS.
MAP_ROWS_PER_PROC = 20_000
MAP_MAX_PROCS = 8
# Why an encoded row is not an example (the `drop` column while building).
KEEP, TOO_LONG, SAME = 0, 1, 2
DROP_REASONS = {TOO_LONG: "prompt too long", SAME: "chosen == rejected after truncation"}


@dataclass
class SourceStats:
    """Counts for one dataset in one stage. read = sum(dropped) + other_stages + kept."""

    name: str
    # Rows read from the source (train and eval pools).
    read: int = 0
    # Examples this stage got from it (before blending), train + eval.
    kept: int = 0
    # Records dropped, by reason (at load time and in this stage).
    dropped: Counter = field(default_factory=Counter)
    # Valid records that went to the other stages' slices.
    other_stages: int = 0
    train: int = 0
    eval: int = 0
    # Train examples after weighting (equals `train` without weights).
    blended: int = 0
    path: str | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["dropped"] = dict(self.dropped)
        return d

    @classmethod
    def from_json(cls, d: dict) -> SourceStats:
        return cls(**{**d, "dropped": Counter(d["dropped"])})


class Examples(Sequence):
    """A stage's examples as rows (dicts of token id lists and ints), read from a memory-mapped
    Arrow table (`table`, a datasets.Dataset; None when there are none)."""

    def __init__(self, table=None):
        self.table = table

    def __len__(self) -> int:
        return 0 if self.table is None else len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.rows(range(len(self))[i])
        return self.rows([range(len(self))[i]])[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), 1000):
            yield from self.rows(range(start, min(start + 1000, len(self))))

    def rows(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        """The rows at `indices`, in that order, in one read (the table answers with columns)."""
        indices = list(indices)
        if not indices:
            return []
        columns = self.table[indices]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


class TextBlocks(Sequence):
    """PTX blocks as rows {"input_ids": [block_size ids]}, read from a memory-mapped (n, block_size) array."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.rows(range(len(self))[i])
        return {"input_ids": self.blocks[i].tolist()}

    def rows(self, indices: Iterable[int]) -> list[dict[str, list[int]]]:
        return [{"input_ids": ids} for ids in self.blocks[list(indices)].tolist()]


@dataclass
class StageData:
    train: Examples
    eval: Examples
    stats: list[SourceStats]
    # "built" or "hit", and the cache entry.
    cache: str = ""
    cache_path: str = ""
    split: str = ""

    def summary(self, stage: str) -> str:
        head = f"data for {stage}: {len(self.train)} train / {len(self.eval)} eval examples"
        if self.split:
            head += f" (split {self.split})"
        if self.cache:
            head += f"; cache {self.cache}: {self.cache_path}"
        lines = [head]
        total = sum(s.blended for s in self.stats) or 1
        for s in self.stats:
            where = f" [{s.path}]" if s.path else ""
            drops = ", ".join(f"{k} {v}" for k, v in sorted(s.dropped.items())) or "none"
            lines.append(f"  {s.name}{where}")
            lines.append(f"    read {s.read}, to other stages {s.other_stages}, kept {s.kept} "
                         f"(train {s.train}, eval {s.eval}); dropped {sum(s.dropped.values())}: {drops}; "
                         f"in blend {s.blended} ({100 * s.blended / total:.1f}%)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- splits, blends, prompts


def split_indices(n: int, split: str, stage: str, seed: int, name: str) -> list[int]:
    """This stage's disjoint slice of a shuffled range(n); deterministic for (seed, name)."""
    shares = [float(x) for x in split.split(",")]
    order = list(range(n))
    random.Random(f"{seed}-{name}").shuffle(order)
    bounds = [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    cut = [round(n * b / bounds[-1]) for b in bounds]
    i = STAGE_INDEX[stage]
    return order[cut[i]: cut[i + 1]]


def blend_counts(sizes: list[int], weights: list[float | None]) -> list[int]:
    """Train examples to draw from each dataset. No weights: every example once. Weights: the
    total stays sum(sizes) and dataset i gets round(total * w_i / sum(w)) (repeating when short)."""
    if not weights or any(w is None for w in weights):
        return list(sizes)
    live = [w if n > 0 else 0.0 for w, n in zip(weights, sizes)]
    total, wsum = sum(sizes), sum(live)
    return [round(total * w / wsum) if wsum else 0 for w in live]


def _draw(n: int, count: int, rng: random.Random) -> list[int]:
    """`count` indices into range(n): whole shuffled passes, then a shuffled partial pass."""
    out: list[int] = []
    while n and len(out) < count:
        order = list(range(n))
        rng.shuffle(order)
        out += order[: count - len(out)]
    return out


def format_prompt(messages: list[dict[str, str]], tokenizer, prompt_format: str) -> str:
    """human_assistant: "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:" (hh-rlhf's
    own format; a system message goes first, unlabeled); chat_template: the tokenizer's template."""
    if prompt_format == "chat_template":
        _require_chat_template(tokenizer)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    names = {"user": "Human", "assistant": "Assistant"}
    text = "".join(m["content"] + "\n\n" if m["role"] == "system" else f"\n\n{names[m['role']]}: {m['content']}"
                   for m in messages)
    return text + "\n\nAssistant:"


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data_blend.prompt_format=chat_template but the tokenizer has no chat template; "
                        "use data_blend.prompt_format=human_assistant or a tokenizer with one")


def _encode_batch(batch: dict[str, list], tokenizer, stage: str, prompt_format: str, max_prompt_len: int,
                  max_answer_len: int) -> dict[str, list]:
    """Dataset.map, batched: the token ids of `stage`'s columns for a batch of records (messages,
    chosen, rejected), and a `drop` code per row (KEEP, TOO_LONG prompt, SAME answers after truncation)."""
    specials = prompt_format != "chat_template"  # a chat template writes its own special tokens
    prompts = tokenizer([format_prompt(m, tokenizer, prompt_format) for m in batch["messages"]],
                        add_special_tokens=specials).input_ids
    drop = [TOO_LONG if len(p) > max_prompt_len else KEEP for p in prompts]
    if stage == "ppo":
        return {"prompt_input_ids": prompts, "reference": batch["reference"], "drop": drop}
    eos = tokenizer.eos_token_id

    def answers(texts: list[str]) -> list[list[int]]:
        ids = tokenizer([" " + t for t in texts], add_special_tokens=False).input_ids
        return [a[: max_answer_len - 1] + [eos] for a in ids]

    chosen = answers(batch["chosen"])
    prompt_len = [len(p) for p in prompts]
    if stage == "sft":
        return {"input_ids": [p + c for p, c in zip(prompts, chosen)], "prompt_len": prompt_len, "drop": drop}
    rejected = answers(batch["rejected"])
    # answers that differ only past max_answer_len teach the reward model nothing
    drop = [SAME if code == KEEP and c == r else code for code, c, r in zip(drop, chosen, rejected)]
    return {"chosen_input_ids": [p + c for p, c in zip(prompts, chosen)],
            "rejected_input_ids": [p + r for p, r in zip(prompts, rejected)], "prompt_len": prompt_len, "drop": drop}


def _features(stage: str):
    import datasets

    ids, number = datasets.List(datasets.Value("int32")), datasets.Value("int32")
    columns = {"sft": {"input_ids": ids, "prompt_len": number},
               "rm": {"chosen_input_ids": ids, "rejected_input_ids": ids, "prompt_len": number},
               "ppo": {"prompt_input_ids": ids, "reference": datasets.Value("string")}}[stage]
    return datasets.Features({**columns, "drop": datasets.Value("int8")})


def _map_procs(n_rows: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAP_MAX_PROCS, cores, n_rows // MAP_ROWS_PER_PROC))


@contextlib.contextmanager
def _no_tokenizer_threads(when: bool):
    """Worker processes tokenize one thread each (and the tokenizers library does not warn about the fork)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if when and before is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if when and before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _texts(records: list[Record], stage: str):
    """The records' columns that `stage` tokenizes, as an (in-memory) datasets.Dataset."""
    import datasets

    columns: dict[str, list] = {"messages": [r.messages for r in records]}
    if stage != "ppo":
        columns["chosen"] = [r.chosen for r in records]
    if stage == "rm":
        columns["rejected"] = [r.rejected for r in records]
    if stage == "ppo":  # what a reward function checks an answer against
        columns["reference"] = [r.chosen if r.reference is None else r.reference for r in records]
    return datasets.Dataset.from_dict(columns)


def _encode(texts, tokenizer, cfg: RunConfig, stage: str, cache_file: Path):
    """A datasets.Dataset (written to `cache_file`, memory-mapped) of the encoded rows of `texts`
    (from _texts) in order, with their `drop` codes; None for no rows."""
    if not len(texts):
        return None
    d = cfg.data_blend
    procs = _map_procs(len(texts))
    with _no_tokenizer_threads(procs > 1):
        return texts.map(_encode_batch, batched=True, remove_columns=texts.column_names, features=_features(stage),
                         fn_kwargs={"tokenizer": tokenizer, "stage": stage, "prompt_format": d.prompt_format,
                                    "max_prompt_len": d.max_prompt_len, "max_answer_len": d.max_answer_len},
                         num_proc=procs if procs > 1 else None, cache_file_name=str(cache_file),
                         load_from_cache_file=False, new_fingerprint=cache_file.stem)


# --------------------------------------------------------------------------- stage data


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data_blend.cache_dir) if cfg.data_blend.cache_dir else cfg.output_dir / "data_cache"


def _specs(cfg: RunConfig, stage: str) -> list[tuple[str, DatasetSpec, bool]]:
    """(config key, spec, sft_only) of every dataset that feeds `stage`."""
    out = [(f"data_blend.datasets[{i}]", s, False) for i, s in enumerate(cfg.data_blend.datasets)]
    if stage == "sft":
        out += [(f"data_blend.sft_only[{i}]", s, True) for i, s in enumerate(cfg.data_blend.sft_only)]
    return out


def _stage_key(cfg: RunConfig, stage: str, tokenizer) -> str:
    d = dataclasses.asdict(cfg.data_blend)
    for k in ("cache_dir", "ptx_path", "ptx_field", "ptx_max_blocks", "name"):
        d.pop(k)
    files = {key: file_fingerprint(source_files(spec, key)) for key, spec, _ in _specs(cfg, stage)}
    # a generated source has no files: its generator's version stands in, so a changed generator
    # does not hit the records an older one cached
    generated = {key: GENERATOR_VERSIONS[spec.name] for key, spec, _ in _specs(cfg, stage) if spec.name in GENERATOR_VERSIONS}
    # layout 2: ppo examples carry the reference answer (entries written before lack the column)
    return key_of({"kind": "stage", "layout": 2, "stage": stage, "seed": cfg.run.seed, "data_blend": d,
                   "tokenizer": tokenizer_fingerprint(tokenizer), "files": files,
                   **({"generated": generated} if generated else {})})


def _build_stage(cfg: RunConfig, stage: str, tokenizer, work: Path):
    """(table, train, eval, stats): the encoded rows of every dataset of the stage in one table
    (datasets.Dataset, memory-mapped from `work`; dropped rows included), the indices of its train
    examples (blended, shuffled) and of its eval examples, and the counts per dataset."""
    import datasets
    import numpy as np

    d = cfg.data_blend
    seed = cfg.run.seed
    if d.prompt_format == "chat_template":
        _require_chat_template(tokenizer)
    tables: list = []
    trains: list[list[int]] = []
    weights: list[float | None] = []
    evaluation: list[int] = []
    all_stats: list[SourceStats] = []
    own_share = float(d.split.split(",")[STAGE_INDEX[stage]])
    for n, (key, spec, sft_only) in enumerate(_specs(cfg, stage)):
        if own_share == 0 and not sft_only:  # split gives this stage nothing (its data is sft_only)
            continue
        src: SourceData = read_source(spec, seed, key)
        stats = SourceStats(spec.name, read=src.read, dropped=Counter(src.dropped), path=spec.path)
        # The shuffle's key: the dataset and its file's last two path parts (stable across machines).
        name = spec.name if not spec.path else f"{spec.name}:{'/'.join(Path(spec.path).parts[-2:])}"
        if sft_only:
            train_recs, test_recs = src.train, src.test
        else:
            train_recs = [src.train[i] for i in split_indices(len(src.train), d.split, stage, seed, name)]
            test_recs = [src.test[i] for i in split_indices(len(src.test), d.split, stage, seed, name + "/test")]
        stats.other_stages = len(src.train) + len(src.test) - len(train_recs) - len(test_recs)
        slice_size = len(train_recs) + len(test_recs)
        has_test = bool(src.test)
        del src  # the other stages' records
        if stage == "rm":  # pairs only
            train_recs = [r for r in train_recs if r.rejected is not None]
            test_recs = [r for r in test_recs if r.rejected is not None]
            if len(train_recs) + len(test_recs) < slice_size:
                stats.dropped["no rejected answer"] += slice_size - len(train_recs) - len(test_recs)
        n_train = len(train_recs)
        texts = _texts(train_recs + test_recs, stage)
        del train_recs, test_recs  # the records as Python objects: gone before tokenizing forks workers
        table = _encode(texts, tokenizer, cfg, stage, work / f"{stage}-{n}.arrow")
        del texts
        codes = table.data.column("drop").to_numpy() if table is not None else np.zeros(0, dtype=np.int8)
        for code, reason in DROP_REASONS.items():
            if (dropped := int((codes == code).sum())):
                stats.dropped[reason] += dropped
        offset = sum(len(t) for t in tables)
        train_ix = (offset + np.flatnonzero(codes[:n_train] == KEEP)).tolist()
        test_ix = (offset + n_train + np.flatnonzero(codes[n_train:] == KEEP)).tolist()
        if has_test:
            eval_ix = test_ix
        else:
            n_eval = max(1, round(len(train_ix) * d.eval_fraction)) if len(train_ix) > 1 else 0
            eval_ix, train_ix = train_ix[:n_eval], train_ix[n_eval:]
        stats.kept, stats.train, stats.eval = len(train_ix) + len(eval_ix), len(train_ix), len(eval_ix)
        if not train_ix:
            raise DataError(
                f"{key} ({spec.name}{', ' + spec.path if spec.path else ''}) has no {stage} training examples "
                f"left: read {stats.read} records, {stats.other_stages} went to other stages "
                f"(data_blend.split={d.split}), {slice_size} in the {stage} slice, dropped "
                f"{dict(stats.dropped) or 'none'}, {stats.eval} held out for eval "
                f"(check data_blend.max_prompt_len={d.max_prompt_len}, data_blend.split, {key}.max_records)")
        tables.append(table)
        trains.append(train_ix)
        weights.append(spec.weight)
        evaluation += eval_ix
        all_stats.append(stats)
    if not tables:
        raise DataError(f"data_blend.split={d.split} gives the {stage} stage no data"
                        f"{' and data_blend.sft_only is empty' if stage == 'sft' else ''}; give it a share above 0")
    counts = blend_counts([len(t) for t in trains], weights)
    train: list[int] = []
    for i, (rows, count) in enumerate(zip(trains, counts)):
        picked = rows if count == len(rows) else \
            [rows[j] for j in _draw(len(rows), count, random.Random(f"{seed}-blend-{stage}-{i}"))]
        all_stats[i].blended = len(picked)
        train += picked
    random.Random(seed).shuffle(train)  # the permutation depends on the length only: as if shuffling the rows
    return datasets.concatenate_datasets(tables), train, evaluation, all_stats


def load_stage_data(cfg: RunConfig, stage: str, tokenizer) -> StageData:
    """Train and eval examples of `stage` from every dataset of the blend (cached, memory-mapped)."""
    stage = SLICE_OF.get(stage, stage)
    if stage not in STAGE_INDEX:
        raise ValueError(f"stage must be one of {list(STAGE_INDEX)}, got {stage!r}")
    entry = cache_dir(cfg) / f"{stage}-{_stage_key(cfg, stage, tokenizer)}"

    def build(tmp: Path) -> None:
        work = tmp / "work"
        try:
            table, train, evaluation, stats = _build_stage(cfg, stage, tokenizer, work)
            table = table.remove_columns("drop")
            for part, index in (("train", train), ("eval", evaluation)):
                if index:
                    table.select(index, new_fingerprint=f"{stage}-{part}").save_to_disk(str(tmp / part))
                else:
                    (tmp / part).mkdir()
            del table
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (tmp / "stats.json").write_text(json.dumps([s.to_json() for s in stats], indent=1))

    def load(path: Path) -> tuple[Examples, Examples, list[SourceStats]]:
        import datasets

        parts = [Examples(datasets.load_from_disk(str(path / part)) if (path / part / "state.json").exists() else None)
                 for part in ("train", "eval")]
        stats = [SourceStats.from_json(s) for s in json.loads((path / "stats.json").read_text())]
        return parts[0], parts[1], stats

    with _quiet_datasets():
        (train, evaluation, stats), hit = build_or_load(entry, build, load)
    return StageData(train, evaluation, stats, cache="hit" if hit else "built", cache_path=str(entry),
                     split=cfg.data_blend.split)


class _quiet_datasets:
    """No progress bars from datasets while caching (the summary says what happened)."""

    def __enter__(self):
        import datasets

        self.was = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        if self.was:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------- PTX (pretraining text)


def _ptx_documents(path_or_id: str, text_field: str):
    """Yield the documents (strings) of a text file/folder, a table with a text column, or a hub id."""
    from pipeline.data.sources import SUFFIXES, _datasets_rows, jsonl_rows

    path = Path(path_or_id).expanduser()
    if not path.exists():
        if "/" in path_or_id and not path_or_id.startswith((".", "/", "~")):
            import datasets

            try:
                ds = datasets.load_dataset(path_or_id, split="train")
            except Exception as err:
                raise DataError(f"data_blend.ptx_path={path_or_id}: no such file, and cannot load it from the hub "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
            for i, row in enumerate(ds):
                if text_field not in row:
                    raise DataError(f"data_blend.ptx_path={path_or_id} row {i + 1}: no field {text_field!r} "
                                    "(set data_blend.ptx_field)")
                yield row[text_field]
            return
        raise DataError(f"data_blend.ptx_path={path_or_id}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and (p.suffix == ".txt" or p.name.endswith(SUFFIXES)))
    if not files:
        raise DataError(f"data_blend.ptx_path={path_or_id}: folder has no .txt or data files")
    for f in files:
        if f.name.endswith(SUFFIXES):
            rows = _datasets_rows(f) if f.suffix in (".parquet", ".csv", ".arrow") else jsonl_rows(f)
            for where, row in rows:
                if row.get(text_field) is None:
                    raise DataError(f"{where}: record has no field {text_field!r} (set data_blend.ptx_field). "
                                    f"First bad record: {json.dumps(row, default=str)[:200]}")
                yield str(row[text_field])
        else:
            yield f.read_text(encoding="utf-8", errors="replace")


def load_ptx_data(cfg: RunConfig, tokenizer, block_size: int) -> TextBlocks:
    """Fixed blocks of `block_size` tokens from data_blend.ptx_path (documents joined by eos),
    cached as .npy under the cache dir and memory-mapped from there."""
    import numpy as np

    d = cfg.data_blend
    if not d.ptx_path:
        raise DataError("data_blend.ptx_path is not set; give a text file, folder or dataset for the PTX loss")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    p = Path(d.ptx_path).expanduser()
    files = file_fingerprint([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())) if p.exists() else []
    key = key_of({"kind": "ptx", "path": d.ptx_path, "files": files, "field": d.ptx_field, "block": block_size,
                  "max_blocks": d.ptx_max_blocks, "tokenizer": tokenizer_fingerprint(tokenizer)})
    entry = cache_dir(cfg) / f"ptx-{key}"

    def build(tmp: Path) -> None:
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        need = d.ptx_max_blocks * block_size if d.ptx_max_blocks else None
        for doc in _ptx_documents(d.ptx_path, d.ptx_field):
            lines = doc.splitlines(keepends=True)
            chunks = ["".join(lines[i: i + 64]) for i in range(0, len(lines), 64)]
            for chunk_ids in tokenizer(chunks, add_special_tokens=False).input_ids if chunks else []:
                ids += chunk_ids
            ids.append(eos)
            if need and len(ids) >= need:
                break
        n = len(ids) // block_size
        if need:
            n = min(n, d.ptx_max_blocks)
        if n == 0:
            raise DataError(f"data_blend.ptx_path={d.ptx_path}: {len(ids)} tokens, fewer than one block of "
                            f"{block_size}")
        np.save(tmp / "blocks.npy", np.asarray(ids[: n * block_size], dtype=np.int64).reshape(n, block_size))

    def load(path: Path) -> TextBlocks:
        return TextBlocks(np.load(path / "blocks.npy", mmap_mode="r", allow_pickle=False))

    blocks, _ = build_or_load(entry, build, load)
    return blocks

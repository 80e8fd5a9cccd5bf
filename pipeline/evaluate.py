"""Judge trained models: `python -m pipeline.evaluate <command> key=value ...`.

    compare  answers of two models to the same prompts, side by side (DeepSpeed-Chat's prompt_eval.py)
        python -m pipeline.evaluate compare run=outputs/demo                  # sft/final vs ppo/final/actor
        python -m pipeline.evaluate compare a=facebook/opt-1.3b b=outputs/x/ppo/final/actor \\
            prompts=../shared/data/mt_bench/question.jsonl limit=10 turns=all out=compare.md
    rm       a reward model on preference pairs: accuracy, mean chosen / rejected score, margin (rw_eval.py)
        python -m pipeline.evaluate rm run=outputs/demo                       # the run's held-out RM pairs
        python -m pipeline.evaluate rm rm=outputs/x/rm/final data_blend=hh-rlhf \\
            data_blend.path=../shared/data/hh-rlhf/helpful-base/test.jsonl.gz
        python -m pipeline.evaluate rm rm=outputs/x/rm/final data_blend.path=prefs.jsonl \\
            data_blend.fields.answer_a=response_a data_blend.fields.answer_b=response_b data_blend.fields.label=winner
    reward   the reward model's score of policies' answers to held-out prompts
        python -m pipeline.evaluate reward run=outputs/demo                   # sft vs ppo, the run's PPO eval prompts
        python -m pipeline.evaluate reward models=a,b rm=outputs/x/rm/final prompts=questions.jsonl
    truth    ground truth on the built-in task's held-out questions (pipeline.truth): the share of
             answers that state the right fact, greedy and sampled, with 95% intervals; each policy
             minus the first (paired bootstrap); the reward model's held-out accuracy per rejection kind
        python -m pipeline.evaluate truth run=outputs/demo                    # sft, ppo (and dpo) vs sft, rm
        python -m pipeline.evaluate truth models=outputs/a/sft/final,outputs/b/dpo/final samples=16
    python -m pipeline.evaluate --help                                        # this, and every option

Data: anything the pipeline trains on, described as for training: `data_blend=<group>` and
`data_blend.*` keys, composed by Hydra from conf/data_blend/ (only `data_blend.*` keys: the
`local` group), so local files with a field mapping (prompt/chosen/rejected, two answers plus a
preference label, message lists), hh-rlhf files and the hub datasets' adapters all work. Every
record is used (train and test files alike; no split between stages). rm tokenizes the pairs as
the rm stage does; compare and reward take each record's dialogue so far as the prompt. What is
dropped is counted by reason and printed per dataset, as training does. `data=FILE` is short for
data_blend=local data_blend.path=FILE, `data=builtin` for data_blend=builtin.

`run=<run folder>` fills what is not given: a/b = sft/final and ppo/final/actor, rm = rm/final,
and the data = the run's own held-out split (the same pairs / prompts the stages evaluated on).
Prompt files (prompts=): .jsonl/.json(.gz) rows with "turns" (MT-Bench), "prompt", "question",
"instruction" or an hh-rlhf "chosen" dialogue; or .txt, one prompt a line.
Prompts are written as the model was trained (prompt_format=auto: its run's data_blend.prompt_format)
and cut to its run's data_blend.max_prompt_len (or max_prompt_len=); answers as max_answer_len.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.chat import (
    ChatSession,
    TurnMarkers,
    cut_answer,
    generate_batch,
    load_policy,
    option,
    option_args,
    options_help,
    parse_options,
    pick_device,
    pick_dtype,
    resolve_prompt_format,
    run_config_of,
)
from pipeline.config import ConfigError, RunConfig, RunSection, load_run_config
from pipeline.data_schema import DataBlendSection, DatasetSpec, validate_data_blend
from pipeline.errors import USER_ERROR_EXIT_CODE, UserError
from pipeline.tracking import progress

COMMANDS = ("compare", "rm", "reward", "truth")
# Evaluation formats the data as the model was trained; these data_blend keys have options of their own.
OWN_OPTIONS = {"data_blend.prompt_format": "prompt_format", "data_blend.max_prompt_len": "max_prompt_len",
               "data_blend.max_answer_len": "max_answer_len"}


@dataclass
class EvalSettings:
    command: Optional[str] = option(None, "what to measure (the first word)", COMMANDS)
    run: Optional[str] = option(None, "a run folder: fills a/b, models, rm and the data (its held-out split)")
    a: Optional[str] = option(None, "compare: the first model (folder or hub id; run: sft/final)")
    b: Optional[str] = option(None, "compare: the second model (run: ppo/final/actor)")
    models: Optional[str] = option(None, "reward, truth: the policies to score, comma-separated (run: sft and ppo)")
    samples: int = option(8, "truth: sampled answers per question (temperature 1; 0 = greedy only)")
    rm: Optional[str] = option(None, "the reward model folder (run: rm/final)")
    prompts: Optional[str] = option(None, "compare, reward: a prompt file (see the module doc)")
    data: Optional[str] = option(None, "a data file (short for data_blend=local data_blend.path=FILE) or builtin")
    data_blend: Optional[DataBlendSection] = option(None, "data_blend=<group> and data_blend.* keys, as for training")
    limit: Optional[int] = option(None, "prompts or pairs to use; null = compare 10, reward 64, rm all")
    turns: str = option("first", "compare: ask each prompt's first turn, or all its turns in one conversation",
                        ("first", "all"))
    max_new_tokens: Optional[int] = option(None, "longest answer, in tokens; null = 128")
    temperature: float = option(0.0, "sampling temperature; 0 = greedy")
    top_p: float = option(1.0, "nucleus sampling share")
    top_k: int = option(0, "sample from the k likeliest tokens; 0 = off")
    repetition_penalty: float = option(1.0, "1.0 = off")
    batch_size: int = option(8, "prompts or sequences per forward pass")
    max_prompt_len: Optional[int] = option(None, "prompt tokens kept; null = the run's data_blend.max_prompt_len, else 256")
    max_answer_len: Optional[int] = option(None, "rm: answer tokens kept; null = the run's, else 256")
    prompt_format: str = option("auto", "auto = the model's run's data_blend.prompt_format, else human_assistant",
                                ("auto", "human_assistant", "chat_template"))
    device: str = option("auto", "auto (cuda when there is one), cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto = bf16 on a GPU that has it, else fp32", ("auto", "fp32", "bf16", "fp16"))
    seed: Optional[int] = option(0, "sampling seed, and the built-in data's")
    out: Optional[str] = option(None, "write the result: .json; compare also .jsonl or .md")
    trust_remote_code: bool = option(False, "run the models' own code from the hub (only for models you trust)")


# --------------------------------------------------------------------------- data descriptions


def compose_data_blend(overrides: Sequence[str]) -> DataBlendSection:
    """The data_blend `python -m pipeline <overrides>` would train on: Hydra composes conf/ with the
    data_blend=<group> and data_blend.* overrides (the `local` group when none is named)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from pipeline import CONF_DIR
    from pipeline.config import register_resolvers

    keys = [item.split("=", 1)[0].lstrip("+~") for item in overrides]
    for key in keys:
        if key in OWN_OPTIONS:
            raise ConfigError(f"{key}: evaluation formats the data as the model was trained (its run's value); "
                              f"set {OWN_OPTIONS[key]}= to change it")
    if "data_blend" not in keys:
        overrides = ["data_blend=local", *overrides]
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides))
        # Resolved where it sits (the groups refer to ${data_blend.path}), then typed.
        plain = OmegaConf.to_container(composed.data_blend, resolve=True)
        blend = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataBlendSection), plain))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    try:
        validate_data_blend(blend)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return blend


def _one_line(err: Exception) -> str:
    """Hydra's message in one line: what failed, why (its cause), the group's options when it names them."""
    text = str(err)
    line = text.splitlines()[0]
    if err.__cause__:
        line += f" ({str(err.__cause__).splitlines()[0]})"
    if "Available options" in text:
        options = text.split("Available options", 1)[1].split("Config search path", 1)[0].split(":", 1)[1].split()
        line += f"; available: {', '.join(options)}"
    return line


def data_description(s: EvalSettings) -> DataBlendSection | None:
    """The data to measure on from data_blend or data= (None: neither was given)."""
    if s.data and s.data_blend:
        raise ConfigError(f"data={s.data} and data_blend both describe the data; give one of them")
    if s.data == "builtin":
        return compose_data_blend(["data_blend=builtin"])
    if s.data:
        if not Path(s.data).expanduser().exists():
            raise ConfigError(f"data={s.data}: no such file or folder")
        return DataBlendSection(name="local", path=s.data, datasets=[DatasetSpec(name="local", path=s.data)])
    return s.data_blend


def describe(blend: DataBlendSection) -> str:
    return ", ".join(d.name + (f" ({d.path})" if d.path else "") for d in blend.datasets)


def tokenized_examples(blend: DataBlendSection, stage: str, tokenizer, prompt_format: str, max_prompt_len: int,
                       max_answer_len: int, seed: int) -> tuple[list[dict], list]:
    """Every example of the blend's datasets for `stage`, tokenized as that stage does (the same
    drops, counted per dataset in the returned SourceStats): the whole blend goes to the stage's
    slice, unweighted, cached only for this call."""
    from pipeline.data import load_stage_data

    shares = {"sft": "1,0,0", "rm": "0,1,0", "ppo": "0,0,1"}[stage]
    with tempfile.TemporaryDirectory(prefix="evaluate-data-") as scratch:
        whole = dataclasses.replace(
            blend, split=shares, sft_only=[], datasets=[dataclasses.replace(d, weight=None) for d in blend.datasets],
            prompt_format=prompt_format, max_prompt_len=max_prompt_len, max_answer_len=max_answer_len,
            cache_dir=scratch)
        cfg = RunConfig(run=RunSection(seed=seed, output_dir=scratch), data_blend=whole)
        data = load_stage_data(cfg, stage, tokenizer)
        return list(data.eval) + list(data.train), data.stats


def prompt_records(blend: DataBlendSection, seed: int) -> tuple[list[dict[str, Any]], list]:
    """Prompts from every record of the blend's datasets: {"id", "category" (the dataset),
    "history" (the dialogue before the last user turn), "turns" ([that turn])}, and per-dataset counts."""
    from pipeline.data import SourceStats, read_source

    prompts: list[dict[str, Any]] = []
    stats = []
    for i, spec in enumerate(blend.datasets):
        src = read_source(spec, seed, f"data_blend.datasets[{i}]")
        records = src.train + src.test
        stats.append(SourceStats(spec.name, read=src.read, kept=len(records), dropped=src.dropped, path=spec.path))
        prompts += [{"id": f"{i}.{n + 1}" if len(blend.datasets) > 1 else n + 1, "category": spec.name,
                     "history": r.messages[:-1], "turns": [r.messages[-1]["content"]]} for n, r in enumerate(records)]
    return prompts, stats


def data_summary(stats: list, what: str) -> str:
    """Per dataset: records read, kept, dropped by reason (the training summary's counts)."""
    lines = [f"data: {sum(st.kept for st in stats)} {what} from {len(stats)} dataset(s)"]
    for st in stats:
        drops = ", ".join(f"{reason} {n}" for reason, n in sorted(st.dropped.items())) or "none"
        lines.append(f"  {st.name}{f' [{st.path}]' if st.path else ''}: read {st.read}, kept {st.kept}; "
                     f"dropped {sum(st.dropped.values())}: {drops}")
    return "\n".join(lines)


def stats_json(stats: list) -> list[dict]:
    return [{"name": st.name, "path": st.path, "read": st.read, "kept": st.kept, "dropped": dict(st.dropped)}
            for st in stats]


# --------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """[{"id", "category", "history": [], "turns": [user turn texts]}] from a prompt file (see the module doc)."""
    from pipeline.data import DataError, split_dialogue

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"prompts={path}: no such file")
    out: list[dict[str, Any]] = []
    if path.suffix == ".txt":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                out.append({"id": i + 1, "category": None, "history": [], "turns": [line.strip()]})
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
        try:
            rows = json.loads(text) if path.name.endswith((".json", ".json.gz")) else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DataError(f"prompts={path}: not JSON ({err})") from None
        for i, row in enumerate(rows):
            if isinstance(row, str):
                turns = [row]
            elif "turns" in row:
                turns = [t for t in row["turns"] if isinstance(t, str)]
            elif "chosen" in row and isinstance(row["chosen"], str) and "Assistant:" in row["chosen"]:
                turns = [m["content"] for m in split_dialogue(row["chosen"])[:-1] if m["role"] == "user"]
            else:
                value = next((row[k] for k in ("prompt", "question", "instruction", "text", "input") if k in row), None)
                if isinstance(value, list):
                    turns = [m["content"] for m in value if isinstance(m, dict) and m.get("role") == "user"]
                else:
                    turns = [value] if isinstance(value, str) else []
            if turns:
                out.append({"id": row.get("question_id", row.get("id", i + 1)) if isinstance(row, dict) else i + 1,
                            "category": row.get("category") if isinstance(row, dict) else None, "history": [],
                            "turns": turns})
    if not out:
        raise DataError(f"prompts={path}: no prompts found")
    return out[:limit] if limit else out


def _run_split(run: str | Path, stage: str) -> tuple[list[dict], Any]:
    """The held-out examples the `stage` evaluated on (from the run's data cache), and the run's tokenizer."""
    from pipeline.data import load_stage_data
    from pipeline.models import load_tokenizer

    cfg = load_run_config(run)
    # The run where it is now (config.yaml may name it relative to where it was started).
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(Path(run).expanduser())))
    tokenizer = load_tokenizer(cfg.tokenizer_source, cfg.output_dir, cfg.model.trust_remote_code)
    data = load_stage_data(cfg, stage, tokenizer)
    return list(data.eval or data.train), tokenizer


def _lengths(s: EvalSettings, model_path: str) -> tuple[int, int]:
    """(max_prompt_len, max_answer_len): the options, else the run's data_blend, else 256."""
    cfg = load_run_config(s.run) if s.run else run_config_of(model_path)
    return (s.max_prompt_len or (cfg.data_blend.max_prompt_len if cfg else 256),
            s.max_answer_len or (cfg.data_blend.max_answer_len if cfg else 256))


def _generation(s: EvalSettings) -> EvalSettings:
    return dataclasses.replace(s, max_new_tokens=s.max_new_tokens or 128)


def _prompt_ids(tokenizer, turns_so_far: list[dict], fmt: str, max_len: int) -> list[int]:
    from pipeline.data import format_prompt

    ids = tokenizer(format_prompt(turns_so_far, tokenizer, fmt), add_special_tokens=fmt != "chat_template").input_ids
    return ids[-max_len:]


def _write(out: str | None, payload: Any, markdown: str | None = None) -> None:
    if not out:
        return
    from pipeline.files import atomic_write

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".md" and markdown is not None:
        atomic_write(path, markdown)
    elif path.suffix == ".jsonl" and isinstance(payload, list):
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in payload))
    else:
        atomic_write(path, json.dumps(payload, indent=2))
    print(f"written: {path}", file=sys.stderr)


# --------------------------------------------------------------------------- compare


def answers_of(path: str, prompts: list[dict], s: EvalSettings, max_prompt_len: int) -> list[list[str]]:
    """Each prompt's answers (one per turn asked) from the model at `path`."""
    model, tokenizer = load_policy(path, s.device, s.dtype, s.trust_remote_code)
    fmt = resolve_prompt_format(path, s.prompt_format)
    if s.turns == "all":
        session = ChatSession(path, model=model, tokenizer=tokenizer, **_chat_kwargs(s))
        out = []
        for p in progress(prompts, desc=f"answers {Path(path).name}", unit="prompt"):
            session.clear()
            session.history = list(p["history"])
            out.append([session.ask(t) for t in p["turns"]])
        return out
    turns = TurnMarkers(tokenizer, fmt)
    out = []
    for start in progress(range(0, len(prompts), s.batch_size), desc=f"answers {Path(path).name}", unit="batch"):
        chunk = prompts[start: start + s.batch_size]
        ids = [_prompt_ids(tokenizer, p["history"] + [{"role": "user", "content": p["turns"][0]}], fmt, max_prompt_len)
               for p in chunk]
        out += [[turns.answer(r)] for r in generate_batch(model, tokenizer, ids, s, turns=turns)]
    return out


def _chat_kwargs(s: EvalSettings) -> dict:
    return dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                repetition_penalty=s.repetition_penalty, prompt_format=s.prompt_format, device=s.device,
                dtype=s.dtype, trust_remote_code=s.trust_remote_code)


def _label(path: str, run: str | None) -> str:
    p = Path(path)
    if run and p.exists():
        try:
            return str(p.resolve().relative_to(Path(run).resolve()))
        except ValueError:
            pass
    return path


def compare(s: EvalSettings) -> list[dict]:
    a = s.a or (f"{s.run}/sft/final" if s.run else None)
    b = s.b or (f"{s.run}/ppo/final/actor" if s.run else None)
    if not a or not b:
        raise ConfigError("compare needs a=<model> b=<model> (or run=<run folder>)")
    s = _generation(s)
    max_prompt_len, _ = _lengths(s, b)
    limit = s.limit or 10
    blend = data_description(s)
    if s.prompts and blend:
        raise ConfigError(f"prompts={s.prompts} and data_blend/data both give prompts; give one of them")
    if s.prompts:
        prompts = read_prompts(s.prompts, limit)
    elif blend:
        prompts, stats = prompt_records(blend, s.seed or 0)
        print(data_summary(stats, "prompts"))
        prompts = prompts[:limit]
    elif s.run:
        examples, tokenizer = _run_split(s.run, "ppo")
        prompts = [{"id": i + 1, "category": None, "history": [],
                    "turns": [cut_answer(_strip_format(tokenizer.decode(e["prompt_input_ids"], skip_special_tokens=True)))]}
                   for i, e in enumerate(examples[:limit])]
    else:
        raise ConfigError("compare needs prompts=<file> or data_blend (or run=<run folder> for its held-out prompts)")
    if s.seed is not None:
        torch.manual_seed(s.seed)
    ans_a = answers_of(a, prompts, s, max_prompt_len)
    ans_b = answers_of(b, prompts, s, max_prompt_len)
    la, lb = _label(a, s.run), _label(b, s.run)
    rows, md = [], [f"# {la} vs {lb}", "", f"| # | prompt | {la} | {lb} |", "|---|---|---|---|"]
    for p, xa, xb in zip(prompts, ans_a, ans_b):
        rows.append({"id": p["id"], "category": p["category"], "turns": p["turns"][: len(xa)], "a": xa, "b": xb,
                     "model_a": a, "model_b": b})
        head = f"[{p['id']}]" + (f" ({p['category']})" if p.get("category") else "")
        for t, (q, x, y) in enumerate(zip(p["turns"], xa, xb)):
            print(f"{head if t == 0 else ' ' * len(head)} Human: {q}")
            print(f"    A {la}: {x}")
            print(f"    B {lb}: {y}")
            md.append(f"| {p['id']}{'.' + str(t + 1) if len(xa) > 1 else ''} | {_cell(q)} | {_cell(x)} | {_cell(y)} |")
        print()
    _write(s.out, rows, "\n".join(md) + "\n")
    return rows


def _strip_format(text: str) -> str:
    """Decoded "Human: what ... ? Assistant:" -> the last user turn's text."""
    import re

    parts = re.split(r"Human\s*:", text)
    return parts[-1] if parts else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


# --------------------------------------------------------------------------- reward model on pairs


def load_reward_model(path: str, s: EvalSettings):
    from pipeline.chat import load_tokenizer_for, quiet_transformers
    from pipeline.models import RewardModel

    quiet_transformers()
    device = pick_device(s.device)
    rm = RewardModel.from_pretrained(path, dtype=pick_dtype(s.dtype, device), trust_remote_code=s.trust_remote_code)
    return rm.to(device).eval(), load_tokenizer_for(path, s.trust_remote_code)


@torch.no_grad()
def score_sequences(rm, seqs: list[list[int]], pad_id: int, batch_size: int = 8, desc: str | None = None) -> list[float]:
    """The reward model's score (value at the last real token) of each token sequence."""
    from pipeline.rl_math import last_index

    device = next(rm.parameters()).device
    scores: list[float] = []
    for start in progress(range(0, len(seqs), batch_size), desc=desc, unit="batch", leave=False):
        chunk = seqs[start: start + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in chunk], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
        values = rm(ids, mask)
        rows = torch.arange(len(chunk), device=device)
        scores += values[rows, last_index(mask)].float().tolist()
    return scores


def rm_eval(s: EvalSettings) -> dict:
    rm_path = s.rm or (f"{s.run}/rm/final" if s.run else None)
    if not rm_path:
        raise ConfigError("rm needs rm=<reward model folder> (or run=<run folder>)")
    blend = data_description(s)
    if not blend and not s.run:
        raise ConfigError("rm needs data_blend (or data=<pairs file | builtin>, or run=<run folder> for its "
                          "held-out pairs)")
    rm, tokenizer = load_reward_model(rm_path, s)
    stats: list = []
    if blend:
        max_prompt_len, max_answer_len = _lengths(s, rm_path)
        pairs, stats = tokenized_examples(blend, "rm", tokenizer, resolve_prompt_format(rm_path, s.prompt_format),
                                          max_prompt_len, max_answer_len, s.seed or 0)
        print(data_summary(stats, "pairs"))
        source = describe(blend)
    else:
        pairs, _ = _run_split(s.run, "rm")
        source = f"{s.run} (held-out rm split)"
    pairs = pairs[: s.limit] if s.limit else pairs
    if not pairs:
        raise ConfigError(f"no preference pairs in {source}")
    chosen = score_sequences(rm, [p["chosen_input_ids"] for p in pairs], tokenizer.pad_token_id, s.batch_size, "chosen")
    rejected = score_sequences(rm, [p["rejected_input_ids"] for p in pairs], tokenizer.pad_token_id, s.batch_size, "rejected")
    margins = [c - r for c, r in zip(chosen, rejected)]
    result = {"reward_model": rm_path, "data": source, "pairs": len(pairs),
              "accuracy": sum(m > 0 for m in margins) / len(margins),
              "chosen_score": statistics.fmean(chosen), "rejected_score": statistics.fmean(rejected),
              "margin": statistics.fmean(margins), "margin_std": statistics.pstdev(margins),
              "datasets": stats_json(stats)}
    print(f"reward model {rm_path} on {len(pairs)} pairs from {source}:\n"
          f"  accuracy {result['accuracy']:.4f}   mean score chosen {result['chosen_score']:.4f} / "
          f"rejected {result['rejected_score']:.4f}   margin {result['margin']:.4f} (std {result['margin_std']:.4f})")
    _write(s.out, result)
    return result


# --------------------------------------------------------------------------- reward of a policy's answers


def reward_eval(s: EvalSettings) -> dict:
    models = [m for m in (s.models or "").split(",") if m] or ([s.a] if s.a else []) + ([s.b] if s.b else [])
    if not models and s.run:
        models = [f"{s.run}/sft/final", f"{s.run}/ppo/final/actor"]
    rm_path = s.rm or (f"{s.run}/rm/final" if s.run else None)
    if not models or not rm_path:
        raise ConfigError("reward needs models=<m1,m2,...> and rm=<reward model> (or run=<run folder>)")
    s = _generation(s)
    max_prompt_len, _ = _lengths(s, models[-1])
    limit = s.limit or 64
    blend = data_description(s)
    if s.prompts and blend:
        raise ConfigError(f"prompts={s.prompts} and data_blend/data both give prompts; give one of them")
    if not (s.prompts or blend or s.run):
        raise ConfigError("reward needs prompts=<file> or data_blend (or run=<run folder> for its held-out prompts)")
    rm, rm_tok = load_reward_model(rm_path, s)
    fmt = resolve_prompt_format(rm_path, s.prompt_format)
    stats: list = []
    prompt_msgs = prompt_id_rows = run_tok = None
    if s.prompts or blend:
        if s.prompts:
            prompts, source = read_prompts(s.prompts, limit), s.prompts
        else:
            prompts, stats = prompt_records(blend, s.seed or 0)
            print(data_summary(stats, "prompts"))
            prompts, source = prompts[:limit], describe(blend)
        prompt_msgs = [p["history"] + [{"role": "user", "content": p["turns"][0]}] for p in prompts]
    else:
        examples, run_tok = _run_split(s.run, "ppo")
        prompt_id_rows = [e["prompt_input_ids"] for e in examples[:limit]]
        source = f"{s.run} (held-out ppo prompts)"
    results = {"reward_model": rm_path, "prompts": source, "max_new_tokens": s.max_new_tokens,
               "temperature": s.temperature, "models": {}, "datasets": stats_json(stats)}
    samples: list[dict] = []
    for path in models:
        if s.seed is not None:
            torch.manual_seed(s.seed)
        model, tok = load_policy(path, s.device, s.dtype, s.trust_remote_code)
        same_vocab = tok.get_vocab() == rm_tok.get_vocab()
        if prompt_msgs is not None:
            ids_rows = [_prompt_ids(tok, m, fmt, max_prompt_len) for m in prompt_msgs]
        elif tok.get_vocab() == run_tok.get_vocab():
            ids_rows = prompt_id_rows
        else:
            ids_rows = [tok(run_tok.decode(r, skip_special_tokens=False), add_special_tokens=False).input_ids
                        for r in prompt_id_rows]
        answers: list[list[int]] = []
        for start in progress(range(0, len(ids_rows), s.batch_size), desc=f"generate {_label(path, s.run)}", unit="batch"):
            # As in PPO: the answer runs to its first eos (no cut at "Human:"), and that is what gets scored.
            answers += generate_batch(model, tok, ids_rows[start: start + s.batch_size], s)
        if same_vocab:
            seqs = [p + a for p, a in zip(ids_rows, answers)]
        else:  # another tokenizer: score the text, re-tokenized for the reward model
            seqs = [rm_tok(tok.decode(p + a, skip_special_tokens=True), add_special_tokens=fmt != "chat_template").input_ids
                    + [rm_tok.eos_token_id] for p, a in zip(ids_rows, answers)]
        scores = score_sequences(rm, seqs, rm_tok.pad_token_id, s.batch_size)
        lengths = [len(a) for a in answers]
        label = _label(path, s.run)
        results["models"][label] = {
            "path": path, "mean_reward": statistics.fmean(scores), "std_reward": statistics.pstdev(scores),
            "mean_answer_length": statistics.fmean(lengths),
            "ended_with_eos": sum(1 for a in answers if a and a[-1] == tok.eos_token_id) / len(answers),
            "n": len(scores)}
        for i, (p, a, sc) in enumerate(zip(ids_rows, answers, scores)):
            if len(samples) < 3 * len(models) and i < 3:
                samples.append({"model": label, "prompt": tok.decode(p, skip_special_tokens=True),
                                "answer": tok.decode(a, skip_special_tokens=True), "reward": sc})
        del model
    print(f"reward of answers to {len(ids_rows)} prompts from {source}, scored by {rm_path} "
          f"(temperature {s.temperature}, max_new_tokens {s.max_new_tokens}):")
    for label, r in results["models"].items():
        print(f"  {label:40} mean reward {r['mean_reward']:8.4f} (std {r['std_reward']:.4f})   "
              f"answer length {r['mean_answer_length']:.1f}   ended with eos {100 * r['ended_with_eos']:.0f}%")
    results["samples"] = samples
    _write(s.out, results)
    return results


# --------------------------------------------------------------------------- ground truth


def truth_eval(s: EvalSettings) -> dict:
    """Policies (and a reward model) on the built-in world's held-out questions: see pipeline.truth.
    The world is that of the run's seed (run=) or of seed=."""
    from pipeline.truth import compare_policies, policy_truth, reward_model_by_kind, run_policies, summary_lines

    cfg = load_run_config(s.run) if s.run else None
    paths = [m for m in (s.models or "").split(",") if m]
    if not paths and s.run:
        paths = [str(p) for p in run_policies(Path(s.run), ("sft", "ppo", "dpo")).values()]
    rm_path = s.rm or (f"{s.run}/rm/final" if s.run and (Path(s.run) / "rm" / "final" / "config.json").exists() else None)
    if not paths and not rm_path:
        raise ConfigError("truth needs models=<m1,m2,...> and/or rm=<reward model> (or run=<run folder>)")
    if s.samples < 0:
        raise ConfigError(f"samples={s.samples}: must be >= 0 (0 = greedy answers only)")
    seed = cfg.run.seed if cfg else (s.seed or 0)
    max_new = s.max_new_tokens or (cfg.stage.ppo.generation.max_new_tokens if cfg else 24)
    truth: dict = {"world_seed": seed, "questions": None, "samples_per_question": s.samples, "policies": {}, "gains": {}}
    for path in paths:
        model, tokenizer = load_policy(path, s.device, s.dtype, s.trust_remote_code)
        label = _label(path, s.run)
        truth["policies"][label] = {**policy_truth(model, tokenizer, resolve_prompt_format(path, s.prompt_format),
                                                   seed, max_new, s.samples), "path": path}
        truth["questions"] = truth["policies"][label]["questions"]
        del model
    labels = list(truth["policies"])
    for label in labels[1:]:
        truth["gains"][label] = compare_policies(truth["policies"][label], truth["policies"][labels[0]], seed)
    if rm_path:
        rm, tokenizer = load_reward_model(rm_path, s)
        max_answer_len = s.max_answer_len or (cfg.data_blend.max_answer_len if cfg else 256)
        truth["reward_model"] = reward_model_by_kind(rm, tokenizer, resolve_prompt_format(rm_path, s.prompt_format),
                                                     seed, max_answer_len, s.batch_size)
    truth["baseline"] = labels[0] if labels else None
    print(f"ground truth on the held-out questions of the built-in world (seed {seed}):")
    print("\n".join(summary_lines(truth, prefix="  ")))
    for label, r in truth["policies"].items():
        print(f"  {label}: greedy verdicts {r['greedy_verdicts']}; contested facts right (greedy) "
              f"{r['greedy_contested']['accuracy']:.3f} of {r['greedy_contested']['n']}")
    _write(s.out, truth)
    return truth


# --------------------------------------------------------------------------- the command

RUN: dict[str, Callable[[EvalSettings], Any]] = {"compare": compare, "rm": rm_eval, "reward": reward_eval,
                                                 "truth": truth_eval}


def parse_command_line(argv: Sequence[str]) -> EvalSettings:
    """EvalSettings from the command line: data_blend=<group> / data_blend.* words go to Hydra
    (compose_data_blend), the rest are EvalSettings options; the first bare word is the command."""
    data, own = [], []
    for item in option_args(argv):
        (data if item.split("=", 1)[0].lstrip("+~").split(".")[0] == "data_blend" else own).append(item)
    s = parse_options(own, EvalSettings, positional="command")
    if s.command is None:
        raise ConfigError(f"name what to measure first: {', '.join(COMMANDS)} (--help lists the options)")
    return dataclasses.replace(s, data_blend=compose_data_blend(data)) if data else s


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a in ("-h", "--help") for a in args):
        print(options_help(EvalSettings, __doc__.rstrip()), file=sys.stdout if args else sys.stderr)
        return 0 if args else USER_ERROR_EXIT_CODE
    try:
        s = parse_command_line(args)
        RUN[s.command](s)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())

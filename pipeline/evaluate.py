"""Judge trained models: `python -m pipeline.evaluate <command> key=value ...`.

    compare  answers of two models to the same prompts, side by side (DeepSpeed-Chat's prompt_eval.py)
        python -m pipeline.evaluate compare run=outputs/demo                  # sft/final vs ppo/final/actor
        python -m pipeline.evaluate compare a=facebook/opt-1.3b b=outputs/x/ppo/final/actor \\
            prompts=../shared/data/mt_bench/question.jsonl limit=10 turns=all out=compare.md
    rm       a reward model on preference pairs: accuracy, mean chosen / rejected score, margin (rw_eval.py)
        python -m pipeline.evaluate rm run=outputs/demo                       # the run's held-out RM pairs
        python -m pipeline.evaluate rm rm=outputs/x/rm/final data=../shared/data/hh-rlhf/helpful-base/test.jsonl.gz
    reward   the reward model's score of policies' answers to held-out prompts
        python -m pipeline.evaluate reward run=outputs/demo                   # sft vs ppo, the run's PPO eval prompts
        python -m pipeline.evaluate reward models=a,b rm=outputs/x/rm/final prompts=questions.jsonl

`run=<run folder>` fills what is not given: a/b = sft/final and ppo/final/actor, rm = rm/final,
and the data = the run's own held-out split (the same pairs / prompts the stages evaluated on).
Prompt files: .jsonl/.json(.gz) rows with "turns" (MT-Bench), "prompt", "question",
"instruction" or an hh-rlhf "chosen" dialogue; or .txt, one prompt a line.
Pair files (rm): anything data_blend=local reads (prompt/chosen/rejected, hh-rlhf dialogues, ...).

Settings: limit (prompts or pairs; compare 10, reward 64, rm all), max_new_tokens (the run's
PPO setting or 128), temperature 0 (greedy), top_p, top_k, batch_size 8, turns first|all,
max_prompt_len / max_answer_len (the run's or 256), prompt_format auto, device, dtype, seed 0,
out (.jsonl or .md for compare, .json otherwise), trust_remote_code false.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.chat import (ChatSession, cut_answer, generate_batch, load_policy, parse_overrides, pick_device,
                           pick_dtype, resolve_prompt_format, run_config_of)
from pipeline.tracking import progress

COMMANDS = ("compare", "rm", "reward")


@dataclass
class EvalSettings:
    command: Optional[str] = None
    run: Optional[str] = None
    a: Optional[str] = None
    b: Optional[str] = None
    models: Optional[str] = None  # comma-separated (reward)
    rm: Optional[str] = None
    prompts: Optional[str] = None
    data: Optional[str] = None
    limit: Optional[int] = None
    turns: str = "first"
    max_new_tokens: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    batch_size: int = 8
    max_prompt_len: Optional[int] = None
    max_answer_len: Optional[int] = None
    prompt_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    seed: Optional[int] = 0
    out: Optional[str] = None
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """[{"id", "category", "turns": [user turn texts]}] from a prompt file (see the module doc)."""
    from pipeline.data import split_dialogue

    path = Path(path).expanduser()
    if not path.exists():
        raise SystemExit(f"error: prompts={path}: no such file")
    out: list[dict[str, Any]] = []
    if path.suffix == ".txt":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                out.append({"id": i + 1, "category": None, "turns": [line.strip()]})
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
        rows = json.loads(text) if path.name.endswith((".json", ".json.gz")) else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
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
                            "category": row.get("category") if isinstance(row, dict) else None, "turns": turns})
    if not out:
        raise SystemExit(f"error: prompts={path}: no prompts found")
    return out[:limit] if limit else out


def _run_cfg(run: str | Path):
    from omegaconf import OmegaConf

    from pipeline.config import load_config

    path = Path(run) / "config.yaml"
    if not path.exists():
        raise SystemExit(f"error: run={run}: no config.yaml there (not a run folder)")
    return load_config(OmegaConf.load(path))


def _run_split(run: str | Path, stage: str) -> tuple[list[dict], Any]:
    """The held-out examples the `stage` evaluated on (from the run's data cache), and the run's tokenizer."""
    from pipeline.data import load_stage_data
    from pipeline.models import load_tokenizer

    cfg = _run_cfg(run)
    tokenizer = load_tokenizer(cfg.tokenizer_source, cfg.output_dir, cfg.model.trust_remote_code)
    data = load_stage_data(cfg, stage, tokenizer)
    return (data.eval or data.train), tokenizer


def _lengths(s: EvalSettings, path: str | None) -> tuple[int, int, int]:
    cfg = run_config_of(s.run or path or "")
    d = cfg.get("data_blend") or {}
    gen = ((cfg.get("stage") or {}).get("ppo") or {}).get("generation") or {}
    return (s.max_prompt_len or d.get("max_prompt_len") or 256, s.max_answer_len or d.get("max_answer_len") or 256,
            s.max_new_tokens or gen.get("max_new_tokens") or 128)


def _prompt_ids(tokenizer, turns_so_far: list[dict], fmt: str, max_len: int) -> list[int]:
    from pipeline.data import format_prompt

    ids = tokenizer(format_prompt(turns_so_far, tokenizer, fmt), add_special_tokens=fmt != "chat_template").input_ids
    return ids[-max_len:]


def _write(out: str | None, payload: Any, markdown: str | None = None) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".md" and markdown is not None:
        path.write_text(markdown)
    elif path.suffix == ".jsonl" and isinstance(payload, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in payload))
    else:
        path.write_text(json.dumps(payload, indent=2))
    print(f"written: {path}", file=sys.stderr)


# --------------------------------------------------------------------------- compare


def answers_of(path: str, prompts: list[dict], s: EvalSettings, max_prompt_len: int) -> list[list[str]]:
    """Each prompt's answers (one per turn asked) from the model at `path`."""
    model, tokenizer = load_policy(path, s.device, s.dtype, s.trust_remote_code)
    fmt = resolve_prompt_format(path, s.prompt_format)
    if s.turns == "all":
        session = ChatSession(path, model=model, tokenizer=tokenizer, **_chat_kwargs(s, path))
        out = []
        for p in progress(prompts, desc=f"answers {Path(path).name}", unit="prompt"):
            session.clear()
            out.append([session.ask(t) for t in p["turns"]])
        return out
    out = []
    for start in progress(range(0, len(prompts), s.batch_size), desc=f"answers {Path(path).name}", unit="batch"):
        chunk = prompts[start: start + s.batch_size]
        ids = [_prompt_ids(tokenizer, [{"role": "user", "content": p["turns"][0]}], fmt, max_prompt_len) for p in chunk]
        rows = generate_batch(model, tokenizer, ids, s)
        out += [[cut_answer(tokenizer.decode(r, skip_special_tokens=True))] for r in rows]
    return out


def _chat_kwargs(s: EvalSettings, path: str) -> dict:
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
        raise SystemExit("error: compare needs a=<model> b=<model> (or run=<run folder>)")
    max_prompt_len, _, s.max_new_tokens = _lengths(s, b)
    limit = s.limit or 10
    if s.prompts:
        prompts = read_prompts(s.prompts, limit)
    elif s.run:
        examples, tokenizer = _run_split(s.run, "ppo")
        prompts = [{"id": i + 1, "category": None,
                    "turns": [cut_answer(_strip_format(tokenizer.decode(e["prompt_input_ids"], skip_special_tokens=True)))]}
                   for i, e in enumerate(examples[:limit])]
    else:
        raise SystemExit("error: compare needs prompts=<file> (or run=<run folder> for its held-out prompts)")
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
    from pipeline.chat import load_tokenizer_for
    from pipeline.models import RewardModel

    from pipeline.chat import quiet_transformers

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


def _pairs_from_file(data: str, tokenizer, s: EvalSettings, fmt: str) -> list[dict]:
    from pipeline.data import read_source
    from pipeline.data_schema import DatasetSpec

    max_prompt, max_answer, _ = _lengths(s, s.rm)
    if data == "builtin":
        spec = DatasetSpec(name="builtin", max_records=s.limit or 1000)
    else:
        spec = DatasetSpec(name="local", path=data, max_records=s.limit)
    src = read_source(spec, s.seed or 0, "data")
    records = [r for r in src.train + src.test if r.rejected is not None][: s.limit or None]
    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        p = _prompt_ids(tokenizer, r.messages, fmt, max_prompt)
        c, j = (tokenizer(" " + t, add_special_tokens=False).input_ids[: max_answer - 1] + [eos] for t in (r.chosen, r.rejected))
        if c != j:
            out.append({"chosen_input_ids": p + c, "rejected_input_ids": p + j})
    return out


def rm_eval(s: EvalSettings) -> dict:
    rm_path = s.rm or (f"{s.run}/rm/final" if s.run else None)
    if not rm_path:
        raise SystemExit("error: rm needs rm=<reward model folder> (or run=<run folder>)")
    rm, tokenizer = load_reward_model(rm_path, s)
    if s.data:
        pairs = _pairs_from_file(s.data, tokenizer, s, resolve_prompt_format(rm_path, s.prompt_format))
        source = s.data
    elif s.run:
        pairs, _ = _run_split(s.run, "rm")
        pairs = pairs[: s.limit] if s.limit else pairs
        source = f"{s.run} (held-out rm split)"
    else:
        raise SystemExit("error: rm needs data=<pairs file | builtin> (or run=<run folder> for its held-out pairs)")
    if not pairs:
        raise SystemExit(f"error: no preference pairs in {source}")
    chosen = score_sequences(rm, [p["chosen_input_ids"] for p in pairs], tokenizer.pad_token_id, s.batch_size, "chosen")
    rejected = score_sequences(rm, [p["rejected_input_ids"] for p in pairs], tokenizer.pad_token_id, s.batch_size, "rejected")
    margins = [c - r for c, r in zip(chosen, rejected)]
    result = {"reward_model": rm_path, "data": source, "pairs": len(pairs),
              "accuracy": sum(m > 0 for m in margins) / len(margins),
              "chosen_score": statistics.fmean(chosen), "rejected_score": statistics.fmean(rejected),
              "margin": statistics.fmean(margins), "margin_std": statistics.pstdev(margins)}
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
        raise SystemExit("error: reward needs models=<m1,m2,...> and rm=<reward model> (or run=<run folder>)")
    max_prompt_len, _, s.max_new_tokens = _lengths(s, models[-1])
    limit = s.limit or 64
    rm, rm_tok = load_reward_model(rm_path, s)
    fmt = resolve_prompt_format(rm_path, s.prompt_format)
    if s.prompts:
        prompts = read_prompts(s.prompts, limit)
        prompt_msgs = [[{"role": "user", "content": p["turns"][0]}] for p in prompts]
        source = s.prompts
    elif s.run:
        examples, run_tok = _run_split(s.run, "ppo")
        prompt_msgs = None
        prompt_id_rows = [e["prompt_input_ids"] for e in examples[:limit]]
        source = f"{s.run} (held-out ppo prompts)"
    else:
        raise SystemExit("error: reward needs prompts=<file> (or run=<run folder> for its held-out prompts)")
    results = {"reward_model": rm_path, "prompts": source, "max_new_tokens": s.max_new_tokens,
               "temperature": s.temperature, "models": {}}
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
            answers += generate_batch(model, tok, ids_rows[start: start + s.batch_size], s, stop_at_turn=False)
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


# --------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    s = parse_overrides(args[1:], EvalSettings)
    s.command = args[0]
    if s.turns not in ("first", "all"):
        raise SystemExit(f"error: turns={s.turns}: must be first or all")
    {"compare": compare, "rm": rm_eval, "reward": reward_eval}[s.command](s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

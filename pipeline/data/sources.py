"""Sources -> records. Each adapter turns one row of a dataset into a `Record`
(dialogue so far + chosen answer + optional rejected answer) or a drop reason.

Where the rows come from (`iter_rows`):
  - spec.path null: the hub id in spec.name through `datasets.load_dataset` (the hub, or its cache);
  - a file: .jsonl / .json (optionally .gz) read line by line here, so errors carry line numbers
    (bad UTF-8 and a cut-off gzip stream included);
    .parquet / .csv / .arrow through `datasets`;
  - a folder: a `save_to_disk` folder, or every supported file under it. Files whose name says
    test / validation / valid / val / dev / eval form the eval pool when train files exist too
    (the hub convention); otherwise every file is one pool.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data_schema import DatasetSpec, label_values
from pipeline.errors import UserError

ASSISTANT = "\n\nAssistant:"
SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow")
EVAL_WORDS = {"test", "validation", "valid", "val", "dev", "eval"}


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line or config key."""


@dataclass
class Record:
    """One example: the dialogue so far, and the answer(s) to it."""

    messages: list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content"}], ends with a user turn
    chosen: str
    rejected: str | None = None
    # The right answer a reward function checks against, when it is not `chosen` (a source whose SFT
    # answers may be wrong); None = chosen is the reference.
    reference: str | None = None


@dataclass
class SourceData:
    """Records of one dataset: the train pool, the eval pool (when the source has one), counts."""

    name: str
    train: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)
    read: int = 0
    dropped: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------- dialogue helpers


def split_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    turns: list[dict[str, str]] = []
    for chunk in re.split(r"\n\n(?=(?:Human|Assistant):)", "\n\n" + text.strip()):
        chunk = chunk.strip()
        if chunk.startswith("Human:"):
            turns.append({"role": "user", "content": chunk[len("Human:"):].strip()})
        elif chunk.startswith("Assistant:"):
            turns.append({"role": "assistant", "content": chunk[len("Assistant:"):].strip()})
        elif chunk and turns:
            turns[-1]["content"] += "\n\n" + chunk
        elif chunk:
            turns.append({"role": "user", "content": chunk})
    return turns


ROLE_NAMES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant", "system": "system"}


def normalize_messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    """A list of {"role","content"} (or ShareGPT {"from","value"}) dicts, roles normalized."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{where}: field {column!r} must be a list of messages "
                        f"[{{'role': ..., 'content': ...}}], got {_short(value)}")
    out = []
    for m in value:
        role = str(m.get("role", m.get("from", ""))).lower()
        content = m.get("content", m.get("value"))
        if role not in ROLE_NAMES or content is None:
            raise DataError(f"{where}: field {column!r} has a message without a known role/content: {_short(m)}")
        out.append({"role": ROLE_NAMES[role], "content": str(content).strip()})
    return out


def _short(value: Any, n: int = 200) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= n else text[:n] + "...}"


def _get(row: dict, column: str, where: str, key: str, why: str = "") -> Any:
    """row[column]; a missing or null column fails naming the field, the file/line and the record."""
    value = row.get(column) if isinstance(row, dict) else None
    if value is None:
        hint = f" ({why})" if why else ""
        raise DataError(f"{where}: record has no field {column!r}{hint}; set {key}.fields to map your "
                        f"columns. First bad record: {_short(row)}")
    return value


# --------------------------------------------------------------------------- adapters
# Each adapter: (row, where, spec, key) -> Record, or a str = the reason to drop the row.

Adapter = Callable[[dict, str, DatasetSpec, str], "Record | str"]


def _answer(text: str) -> str:
    return text.strip()


def adapt_hh_raw(row, where, spec, key):
    """Anthropic hh-rlhf: {"chosen","rejected"} full dialogues; the prompt is everything up to
    and including the last "\\n\\nAssistant:" of chosen."""
    chosen = _get(row, "chosen", where, key, "hh-rlhf rows are {'chosen', 'rejected'} dialogues")
    rejected = _get(row, "rejected", where, key, "hh-rlhf rows are {'chosen', 'rejected'} dialogues")
    cut, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut < 0 or cut_r < 0:
        raise DataError(f"{where}: no '\\n\\nAssistant:' turn in chosen/rejected. First bad record: {_short(row)}")
    turns = split_dialogue(chosen[:cut])
    if not turns:
        return "empty prompt"
    return Record(turns, _answer(chosen[cut + len(ASSISTANT):]), _answer(rejected[cut_r + len(ASSISTANT):]))


def _dialogue_prompt(prompt: str) -> list[dict[str, str]]:
    text = prompt.rstrip()
    if text.endswith("Assistant:"):
        text = text[: -len("Assistant:")]
    return split_dialogue(text)


def adapt_dahoas_static(row, where, spec, key):
    """Dahoas/rm-static, Dahoas/full-hh-rlhf: {"prompt" (dialogue ending in Assistant:), "chosen", "rejected"}."""
    prompt = _get(row, "prompt", where, key)
    return Record(_dialogue_prompt(prompt), _answer(_get(row, "chosen", where, key)),
                  _answer(_get(row, "rejected", where, key)))


def adapt_synthetic_gptj(row, where, spec, key):
    """Dahoas/synthetic-instruct-gptj-pairwise: {"prompt" (one instruction), "chosen", "rejected"}."""
    return Record([{"role": "user", "content": _get(row, "prompt", where, key).strip()}],
                  _answer(_get(row, "chosen", where, key)), _answer(_get(row, "rejected", where, key)))


def adapt_yitingxie(row, where, spec, key):
    """yitingxie/rlhf-reward-datasets: "prompt" is the dialogue before "Assistant:"; answers after the last one."""
    prompt = _get(row, "prompt", where, key)
    return Record(split_dialogue(prompt), _answer(_get(row, "chosen", where, key).split("Assistant:")[-1]),
                  _answer(_get(row, "rejected", where, key).split("Assistant:")[-1]))


_CITATION = re.compile(r" ?[\(\[].*?[\)\]]")


def adapt_webgpt(row, where, spec, key):
    """openai/webgpt_comparisons: question.full_text, answer_0/1, score_0/1; citations removed; ties dropped."""
    question = _get(row, "question", where, key)
    text = question.get("full_text") if isinstance(question, dict) else question
    s0, s1 = float(_get(row, "score_0", where, key)), float(_get(row, "score_1", where, key))
    a0, a1 = _get(row, "answer_0", where, key), _get(row, "answer_1", where, key)
    if s0 == s1:
        return "tie (no preference)"
    chosen, rejected = (a0, a1) if s0 > s1 else (a1, a0)
    return Record([{"role": "user", "content": str(text).strip()}], _answer(_CITATION.sub("", chosen)),
                  _answer(_CITATION.sub("", rejected)))


def adapt_shp(row, where, spec, key):
    """stanfordnlp/SHP: history, human_ref_A, human_ref_B, labels (1 = A preferred)."""
    a, b = _get(row, "human_ref_A", where, key), _get(row, "human_ref_B", where, key)
    a_wins = int(_get(row, "labels", where, key)) == 1
    return Record([{"role": "user", "content": _get(row, "history", where, key).strip()}],
                  _answer(a if a_wins else b), _answer(b if a_wins else a))


def _sft_only(prompt_col: str, answer_col: str, first: bool = False) -> Adapter:
    def adapt(row, where, spec, key):
        answer = _get(row, answer_col, where, key)
        if first:
            if not answer:
                return "empty answer"
            answer = answer[0]
        return Record([{"role": "user", "content": str(_get(row, prompt_col, where, key)).strip()}], _answer(str(answer)))
    adapt.__doc__ = f"SFT-only: {prompt_col} -> {answer_col}"
    return adapt


def adapt_miracl(row, where, spec, key):
    """Cohere/miracl-*-queries: query, positive_passages[0].text (chosen), negative_passages[0].text."""
    pos, neg = _get(row, "positive_passages", where, key), row.get("negative_passages") or []
    if not pos:
        return "empty answer"
    return Record([{"role": "user", "content": _get(row, "query", where, key).strip()}], _answer(pos[0]["text"]),
                  _answer(neg[0]["text"]) if neg else None)


def _mkqa(language: str) -> Adapter:
    def adapt(row, where, spec, key):
        query = (_get(row, "queries", where, key) or {}).get(language)
        answers = (_get(row, "answers", where, key) or {}).get(language) or []
        text = answers[0].get("text") if answers else None
        if not query or not text:
            return f"no {language} query or answer"
        return Record([{"role": "user", "content": str(query).strip()}], _answer(str(text)))
    adapt.__doc__ = f"mkqa (apple/mkqa): queries[{language!r}] -> answers[{language!r}][0].text (SFT-only)"
    return adapt


def adapt_qag_jaquad(row, where, spec, key):
    """lmqg/qag_jaquad: questions[0] -> paragraph (SFT-only)."""
    questions = _get(row, "questions", where, key)
    if not questions or not str(questions[0]).strip():
        return "no question"
    return Record([{"role": "user", "content": str(questions[0]).strip()}], _answer(str(_get(row, "paragraph", where, key))))


def adapt_sharegpt_vicuna(row, where, spec, key):
    """pvduy/sharegpt_alpaca_oa_vicuna_format: "prompt" is a "USER: ... ASSISTANT:" dialogue (text
    before the first USER: is a system message), "label" the answer."""
    prompt, label = _get(row, "prompt", where, key), _get(row, "label", where, key)
    turns = re.split(r"(USER:|ASSISTANT:)", str(prompt))
    preamble = [{"role": "system", "content": turns[0].strip()}] if turns[0].strip() else []
    messages = preamble + [{"role": "user" if marker == "USER:" else "assistant", "content": text.strip()}
                           for marker, text in zip(turns[1::2], turns[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the open "ASSISTANT:" the answer follows
    if not messages or messages[-1]["role"] != "user" or not str(label).strip():
        return "prompt does not end with a USER turn, or empty label"
    return Record(messages, _answer(str(label)))


def adapt_gsm8k(row, where, spec, key):
    """GSM8K {"question", "answer"}: the solution, which ends with "#### <number>", is the SFT answer and
    the reference a reward function (gsm8k_exact_match) checks against."""
    question, answer = _get(row, "question", where, key), _get(row, "answer", where, key)
    return Record([{"role": "user", "content": str(question).strip()}], str(answer).strip())


def adapt_local(row, where, spec, key):
    """Any local file with a field mapping in `fields` (see DatasetSpec.fields); auto-detected when empty."""
    f = {k: v for k, v in (spec.fields or {}).items() if v is not None}
    if not any(k in f for k in ("prompt", "chosen", "messages", "answer_a")):
        # Auto-detect the common layouts.
        if "messages" in row:
            f.setdefault("messages", "messages")
        elif "prompt" in row:
            f.update(prompt="prompt", chosen="chosen", **({"rejected": "rejected"} if "rejected" in row else {}))
        elif "chosen" in row and isinstance(row["chosen"], str) and ASSISTANT in row["chosen"]:
            return adapt_hh_raw(row, where, spec, key)
        else:
            f.update(prompt="prompt", chosen="chosen")
    fk = f"{key}.fields"
    if "answer_a" in f:  # two answers + a label saying which won
        a, b = _get(row, f["answer_a"], where, key), _get(row, f.get("answer_b", "answer_b"), where, key)
        label_column = f.get("label", "label")
        value = _get(row, label_column, where, key)
        label = _label_text(value)
        a_wins, b_wins, tie = label_values(f)
        if label in tie:
            return "tie"
        if label in a_wins:
            chosen, rejected = a, b
        elif label in b_wins:
            chosen, rejected = b, a
        elif spec.on_unmapped_label == "drop":
            return "unmapped label"
        else:
            raise DataError(
                f"{where}: label {label_column}={_short(value)} is not mapped (answer_a wins: {sorted(a_wins)}, "
                f"answer_b wins: {sorted(b_wins)}, tie: {sorted(tie)}); set {fk}.a_wins, {fk}.b_wins and {fk}.tie "
                f"to your file's values, or {key}.on_unmapped_label=drop to drop such rows")
        messages = _prompt_messages(_get(row, f.get("prompt", "prompt"), where, key), where, f.get("prompt", "prompt"))
        return Record(messages, _answer(_text(chosen, where, fk)), _answer(_text(rejected, where, fk)))
    if "messages" in f:  # a whole conversation; its last assistant turn is the chosen answer
        conv = normalize_messages(_get(row, f["messages"], where, key), where, f["messages"])
        if not conv or conv[-1]["role"] != "assistant":
            return "conversation does not end with an assistant turn"
        rejected = row.get(f["rejected"]) if "rejected" in f else None
        return Record(conv[:-1], conv[-1]["content"], None if rejected is None else _answer(_text(rejected, where, fk)))
    chosen_value = _get(row, f.get("chosen", "chosen"), where, key)
    rejected_value = row.get(f["rejected"]) if "rejected" in f else None
    if "rejected" in f and rejected_value is None:
        _get(row, f["rejected"], where, key)  # raises naming the field
    if "prompt" in f:
        messages = _prompt_messages(_get(row, f["prompt"], where, key), where, f["prompt"])
    elif isinstance(chosen_value, list):  # chosen is a full conversation (ultrafeedback style)
        messages = normalize_messages(chosen_value, where, f.get("chosen", "chosen"))[:-1]
    else:
        messages = _prompt_messages(_get(row, "prompt", where, key), where, "prompt")
    return Record(messages, _answer(_text(chosen_value, where, fk)),
                  None if rejected_value is None else _answer(_text(rejected_value, where, fk)))


def _label_text(value: Any) -> str:
    """A preference label as the text it is matched by: 1.0 (a float column) reads as "1"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower()


def _prompt_messages(value: Any, where: str, column: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return normalize_messages(value, where, column)
    text = str(value)
    if "Human:" in text and "Assistant:" in text:
        return _dialogue_prompt(text)
    return [{"role": "user", "content": text.strip()}]


def _text(value: Any, where: str, key: str) -> str:
    """An answer column: a string, or a conversation whose last turn is the answer."""
    if isinstance(value, list):
        msgs = normalize_messages(value, where, key)
        return msgs[-1]["content"] if msgs else ""
    return str(value)


ADAPTERS: dict[str, Adapter] = {
    "hh-rlhf": adapt_hh_raw,
    "Anthropic/hh-rlhf": adapt_hh_raw,
    "Dahoas/rm-static": adapt_dahoas_static,
    "Dahoas/full-hh-rlhf": adapt_dahoas_static,
    "Dahoas/synthetic-instruct-gptj-pairwise": adapt_synthetic_gptj,
    "yitingxie/rlhf-reward-datasets": adapt_yitingxie,
    "openai/webgpt_comparisons": adapt_webgpt,
    "stanfordnlp/SHP": adapt_shp,
    # DeepSpeed-Chat's SFT-only / non-English sets whose columns are public.
    "wangrui6/Zhihu-KOL": _sft_only("INSTRUCTION", "RESPONSE"),
    "Hello-SimpleAI/HC3-Chinese": _sft_only("question", "human_answers", first=True),
    "Cohere/miracl-zh-queries-22-12": adapt_miracl,
    "Cohere/miracl-ja-queries-22-12": adapt_miracl,
    "pvduy/sharegpt_alpaca_oa_vicuna_format": adapt_sharegpt_vicuna,
    "mkqa-Chinese": _mkqa("zh_cn"),
    "mkqa-Japanese": _mkqa("ja"),
    "lmqg/qg_jaquad": _sft_only("question", "sentence"),
    "lmqg/qag_jaquad": adapt_qag_jaquad,
    "gsm8k": adapt_gsm8k,
    "openai/gsm8k": adapt_gsm8k,
    "local": adapt_local,
}
# Names that are not hub ids (DeepSpeed-Chat's): the hub id to load.
HUB_ID = {"hh-rlhf": "Anthropic/hh-rlhf", "mkqa-Chinese": "apple/mkqa", "mkqa-Japanese": "apple/mkqa"}


# --------------------------------------------------------------------------- rows


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a .jsonl(.gz) file, or of a .json file holding a list of records.

    Read as bytes and decoded line by line, so that bad UTF-8 names its line; a gzip stream
    that is cut off or corrupt names the last line read whole."""
    line_no = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            lead, byte = b"", fh.read(1)
            while byte.isspace():
                lead, byte = lead + byte, fh.read(1)
            line_no = lead.count(b"\n")
            if byte == b"[" and ".jsonl" not in path.name:
                yield from _json_records(path, lead + byte + fh.read())
                return
            for raw in itertools.chain([byte + fh.readline()], fh):
                line_no += 1
                if not raw.strip():
                    continue
                yield f"{path}:{line_no}", _json_line(raw, path, line_no)
    except (EOFError, zlib.error, OSError) as err:
        last = f" after line {line_no}" if line_no else ""  # line_no: the last line read whole
        if path.suffix == ".gz":
            raise DataError(f"{path}: the gzip data is cut off or corrupt{last} ({err}); download or compress "
                            "the file again") from None
        raise DataError(f"{path}: cannot read it{last} ({err})") from None


def _json_line(raw: bytes, path: Path, line_no: int) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} "
                        "of the line); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {_short(row)}")
    return row


def _json_records(path: Path, data: bytes) -> Iterator[tuple[str, dict]]:
    """(where, row) of a JSON file holding one list of objects."""
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} record {i + 1}: expected a JSON object, got {_short(row)}")
        yield f"{path} record {i + 1}", row


def _datasets_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    kind = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}[path.suffix]
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:
        raise DataError(f"{path}: cannot read it as {kind}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    offset = 2 if kind == "csv" else 1  # csv: line 1 is the header
    for i, row in enumerate(ds):
        yield (f"{path}:{i + offset}" if kind == "csv" else f"{path} row {i + offset}"), row


def source_files(spec: DatasetSpec, key: str) -> list[Path]:
    """The local files of a dataset (empty for a hub id); used for reading and for the cache key."""
    if not spec.path:
        return []
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise DataError(f"{key}.path={spec.path}: no such file or folder")
    if root.is_file():
        return [root]
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        return sorted(p for p in root.rglob("*") if p.is_file())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{key}.path={spec.path}: folder has no {', '.join(SUFFIXES)} files")
    return files


def _is_eval_file(path: Path) -> bool:
    words = set(re.split(r"[^a-z]+", path.name.lower())) | {p.lower() for p in path.parent.parts[-1:]}
    return bool(words & EVAL_WORDS)


def iter_rows(spec: DatasetSpec, key: str) -> Iterator[tuple[str, str, dict]]:
    """(pool, where, row) for every row (at most spec.max_records per pool); pool is "train" or "test"."""
    limit = spec.max_records
    if not spec.path:
        yield from _hub_rows(spec, key, limit)
        return
    files = source_files(spec, key)
    root = Path(spec.path).expanduser()
    if root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists()):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(root))
        except (OSError, ValueError) as err:
            raise DataError(f"{key}.path={spec.path}: not a readable save_to_disk folder ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
        yield from _dict_rows(loaded, str(root), limit)
        return
    eval_files = {p for p in files if _is_eval_file(p)}
    if len(eval_files) == len(files):  # only one pool (e.g. hh-rlhf's test.jsonl.gz alone)
        eval_files = set()
    counts = {"train": 0, "test": 0}
    for path in files:
        pool = "test" if path in eval_files else "train"
        if limit and counts[pool] >= limit:
            continue
        rows = _datasets_rows(path) if path.suffix in (".parquet", ".csv", ".arrow") else jsonl_rows(path)
        for where, row in rows:
            yield pool, where, row
            counts[pool] += 1
            if limit and counts[pool] >= limit:
                break


def _dict_rows(loaded, label: str, limit: int | None) -> Iterator[tuple[str, str, dict]]:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    names = list(loaded)
    train_names = [n for n in names if n.lower() not in EVAL_WORDS] or names[:1]
    test_names = [n for n in names if n not in train_names][:1]
    for pool, picked in (("train", train_names), ("test", test_names)):
        for split in picked:
            ds = loaded[split]
            if limit and len(ds) > limit:
                ds = ds.select(range(limit))
            for i, row in enumerate(ds):
                yield pool, f"{label}[{split}] row {i + 1}", row


def _hub_rows(spec: DatasetSpec, key: str, limit: int | None) -> Iterator[tuple[str, str, dict]]:
    import datasets

    hub_id = HUB_ID.get(spec.name, spec.name)
    if "/" not in hub_id:
        raise DataError(f"{key}.name={spec.name} needs a local copy: set {key}.path (or data_blend.path)=FILE_OR_DIR")
    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as err:
        raise DataError(f"{key}.name={spec.name}: cannot load {hub_id!r} from the Hugging Face hub or its cache "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); download it and "
                        f"set {key}.path=DIR (its parquet/json files or a save_to_disk folder)") from None
    yield from _dict_rows(loaded, hub_id, limit)


# --------------------------------------------------------------------------- read


def read_source(spec: DatasetSpec, seed: int, key: str = "data_blend.datasets[0]") -> SourceData:
    """All records of one dataset, with counts of rows read and dropped (by reason)."""
    from pipeline.data import builtin

    out = SourceData(spec.name)
    if spec.name in builtin.SOURCES:
        rows = builtin.source_records(spec.name, spec.max_records or 4000, seed=seed)
        out.train = [Record([{"role": "user", "content": prompt}], chosen, rejected) for prompt, chosen, rejected in rows]
        out.read = len(rows)
        return out
    if spec.name == "builtin_pick":
        from pipeline.data.pick import generate_records

        out.train = generate_records(spec.max_records or 4000, seed=seed)
        out.read = len(out.train)
        return out
    adapter = ADAPTERS.get(spec.name)
    if adapter is None:
        if spec.path:  # any local file with a field mapping
            adapter = adapt_local
        else:
            raise DataError(f"{key}.name={spec.name}: unknown dataset; known: builtin, builtin-sft, builtin_pick, local, "
                            f"{', '.join(sorted(k for k in ADAPTERS if k != 'local'))} "
                            f"(or set {key}.path to read a local file with {key}.fields)")
    from pipeline.tracking import progress

    for pool, where, row in progress(iter_rows(spec, key), desc=f"reading {spec.name}", unit=" rows"):
        out.read += 1
        try:
            result = adapter(row, where, spec, key)
        except UserError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:  # a value of the wrong shape
            raise DataError(f"{where}: cannot read this record as {spec.name} ({type(err).__name__}: {err}); check "
                            f"{key}.name and {key}.fields. Record: {_short(row)}") from None
        if isinstance(result, str):
            out.dropped[result] += 1
            continue
        if not result.messages:
            out.dropped["empty prompt"] += 1
        elif not result.chosen or (result.rejected is not None and not result.rejected):
            out.dropped["empty answer"] += 1
        elif result.rejected is not None and result.chosen == result.rejected:
            out.dropped["chosen == rejected"] += 1
        else:
            (out.test if pool == "test" else out.train).append(result)
    return out

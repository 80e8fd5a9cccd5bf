"""Talk to a trained model: `python -m pipeline.chat path=<run>/ppo/final/actor [key=value ...]`.

    python -m pipeline.chat path=outputs/demo/ppo/final/actor
    python -m pipeline.chat path=outputs/demo/ppo/final/actor temperature=0 max_new_tokens=64
    printf 'what color is the cat ?\\nquit\\n' | python -m pipeline.chat path=... temperature=0

Multi-turn, in the format the model was trained on: "\\n\\nHuman: ...\\n\\nAssistant:" (DeepSpeed-Chat's),
or the tokenizer's chat template when the run used data_blend.prompt_format=chat_template (found
in the run's config.yaml; `prompt_format=` overrides). Tokens stream as they come; generation
stops at eos or at the next "Human:", and the answer is cut there. `clear` resets the
conversation, `quit` (or end of input) leaves.

Piped stdin (not a terminal): one output line per input line that is not a command, the answer
only (its newlines written as "\\n"); `format=jsonl` writes {"turn","prompt","answer"} lines.

Settings (key=value; DeepSpeed-Chat's --path/--max_new_tokens spellings work too):
    path               model folder (Hugging Face format) or hub id            (required)
    max_new_tokens     128       temperature  0.7 (0 = greedy)    top_p 0.9    top_k 0 (off)
    repetition_penalty 1.0       seed null    system null (a system message first)
    prompt_format      auto | human_assistant | chat_template
    device auto | cpu | cuda     dtype auto | fp32 | bf16 | fp16
    stream true        format text | jsonl        trust_remote_code false

Python API:
    from pipeline.chat import ChatSession
    chat = ChatSession("outputs/demo/ppo/final/actor", temperature=0)
    chat.ask("what color is the cat ?")       # -> "the cat is red ."
    chat.ask("and the dog ?"); chat.clear()
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# Where an answer ends when the model goes on to write the user's next turn.
STOP = re.compile(r"\s*(?:Human|Assistant)\s*:")
_HOLD = re.compile(r"\s*(?:H(?:u(?:m(?:a(?:n\s*)?)?)?)?|A(?:s(?:s(?:i(?:s(?:t(?:a(?:n(?:t\s*)?)?)?)?)?)?)?)?)?$")


@dataclass
class ChatSettings:
    path: Optional[str] = None
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    system: Optional[str] = None
    prompt_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    stream: bool = True
    format: str = "text"
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- key=value arguments


def _convert(value: str, field: dataclasses.Field, name: str):
    if value.lower() in ("null", "none", "~"):
        return None
    hint = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    kind = bool if "bool" in hint else int if "int" in hint else float if "float" in hint else str
    if kind is bool:
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise SystemExit(f"error: {name}={value}: expected true or false")
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"error: {name}={value}: expected {kind.__name__}") from None


def parse_overrides(argv: list[str], settings_cls, positional: str | None = None):
    """`key=value` (Hydra style), `--key=value` / `--key value` (argparse style) -> settings_cls.

    A bare word goes to `positional` when given. Unknown keys fail naming the known ones.
    """
    fields = {f.name: f for f in dataclasses.fields(settings_cls)}
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            raise SystemExit(sys.modules[settings_cls.__module__].__doc__)
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i >= len(args):
                    raise SystemExit(f"error: --{arg} needs a value")
                arg = f"{arg}={args[i]}"
                i += 1
        if "=" not in arg:
            if positional and positional not in values:
                values[positional] = arg
                continue
            raise SystemExit(f"error: {arg!r}: expected key=value")
        key, value = arg.split("=", 1)
        key = key.lstrip("+").replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown setting {key!r}; known: {', '.join(fields)}")
        values[key] = _convert(value, fields[key], key)
    return settings_cls(**values)


# --------------------------------------------------------------------------- loading


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def run_config_of(path: str | Path) -> dict:
    """The config.yaml of the run a model folder belongs to (searched up to 4 levels up), or {}."""
    p = Path(path).expanduser()
    if not p.exists():
        return {}
    p = p.resolve()
    for folder in [p, *list(p.parents)[:4]]:
        cfg = folder / "config.yaml"
        if cfg.is_file():
            from omegaconf import OmegaConf

            try:
                return OmegaConf.to_container(OmegaConf.load(cfg), resolve=False) or {}
            except Exception:  # noqa: BLE001 - a foreign config.yaml: ignore
                return {}
    return {}


def resolve_prompt_format(path: str | Path, prompt_format: str = "auto") -> str:
    if prompt_format != "auto":
        if prompt_format not in ("human_assistant", "chat_template"):
            raise SystemExit(f"error: prompt_format={prompt_format}: must be auto, human_assistant or chat_template")
        return prompt_format
    return (run_config_of(path).get("data_blend") or {}).get("prompt_format") or "human_assistant"


def load_tokenizer_for(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from pipeline.models import ensure_available

    ensure_available(str(path), "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quiet_transformers() -> None:
    """No "Loading weights" bars from transformers where ours are off (pipes, logs, other ranks)."""
    from pipeline.tracking import progress_enabled

    if not progress_enabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_policy(path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model in eval mode on its device, tokenizer) of a causal LM folder or hub id."""
    from pipeline.models import load_causal_lm

    quiet_transformers()

    device = pick_device(device)
    tokenizer = load_tokenizer_for(path, trust_remote_code)
    model = load_causal_lm(str(path), tokenizer, pick_dtype(dtype, device), dropout=None,
                           trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------- generation


def cut_answer(text: str) -> str:
    """The answer up to the next "Human:" / "Assistant:" turn, stripped."""
    m = STOP.search(text)
    return (text[: m.start()] if m else text).strip()


class _StopAtTurn:
    """Stopping criterion: every row's new text has reached a "Human:" turn."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return torch.tensor([bool(STOP.search(t)) for t in texts], device=input_ids.device)


class _AnswerStreamer:
    """A transformers streamer printing the answer as it grows, never past the stop marker.

    It re-decodes the whole answer at each token (answers are short), so multi-token characters
    and word-joining rules come out right; a tail that may become "Human:" is held back.
    """

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.printed = ""
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        m = STOP.search(text)
        if m:
            text = text[: m.start()]
        else:
            hold = _HOLD.search(text)
            text = text[: hold.start()] if hold else text
            if text.endswith("\ufffd"):
                text = text[:-1]
        self._emit(text.lstrip())

    def end(self) -> None:
        self._emit(cut_answer(self.tokenizer.decode(self.ids, skip_special_tokens=True)))

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.write(text[len(self.printed):])
            self.printed = text


def generation_kwargs(s, tokenizer) -> dict:
    sample = s.temperature is not None and s.temperature > 0
    kw = dict(max_new_tokens=s.max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id,
              eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if sample:
        kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if s.repetition_penalty and s.repetition_penalty != 1.0:
        kw["repetition_penalty"] = s.repetition_penalty
    return kw


@torch.no_grad()
def generate_batch(model, tokenizer, prompt_ids: list[list[int]], settings, stream=None,
                   stop_at_turn: bool = True) -> list[list[int]]:
    """Answers (token ids, through the first eos when there is one) to tokenized prompts.

    Prompts are left-padded into one batch; `stream` (a streamer) only for a batch of one.
    stop_at_turn: also stop once every row has started a "Human:" turn (cut it with cut_answer).
    """
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    kwargs = generation_kwargs(settings, tokenizer)
    out = model.generate(input_ids=ids, attention_mask=mask, streamer=stream,
                         stopping_criteria=StoppingCriteriaList([_StopAtTurn(tokenizer, width)] if stop_at_turn else []),
                         **kwargs)
    answers = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        answers.append(row)
    return answers


class ChatSession:
    """A multi-turn conversation with one model. `ask(text)` returns the answer and remembers it."""

    def __init__(self, path: str | Path | None = None, model=None, tokenizer=None, **settings: Any):
        self.settings = dataclasses.replace(ChatSettings(), path=str(path) if path is not None else None, **settings)
        s = self.settings
        if model is None:
            if not s.path:
                raise ValueError("ChatSession needs a model path (or model= and tokenizer=)")
            model, tokenizer = load_policy(s.path, s.device, s.dtype, s.trust_remote_code)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt_format = resolve_prompt_format(s.path or "", s.prompt_format)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = max(8, limit - s.max_new_tokens)
        self.history: list[dict[str, str]] = []

    def clear(self) -> None:
        self.history = []

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of the conversation in the training format; oldest turns dropped to fit."""
        from pipeline.data import format_prompt

        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        specials = self.prompt_format != "chat_template"
        turns = list(messages)
        while True:
            text = format_prompt(system + turns, self.tokenizer, self.prompt_format)
            ids = self.tokenizer(text, add_special_tokens=specials).input_ids
            if len(ids) <= self.max_prompt_tokens or len(turns) <= 1:
                return ids[-self.max_prompt_tokens:]
            turns = turns[2:] if len(turns) > 2 else turns[-1:]

    def reply(self, messages: list[dict[str, str]], stream: Callable[[str], None] | None = None) -> str:
        """The answer to a conversation (a list of {"role","content"} ending with a user turn)."""
        streamer = _AnswerStreamer(self.tokenizer, stream) if stream else None
        answer_ids = generate_batch(self.model, self.tokenizer, [self.prompt_ids(messages)], self.settings, streamer)[0]
        return cut_answer(self.tokenizer.decode(answer_ids, skip_special_tokens=True))

    def ask(self, text: str, stream: Callable[[str], None] | bool | None = None) -> str:
        """Answer `text` in the conversation so far; stream=True prints tokens as they come."""
        if stream is True:
            stream = _stdout_writer
        messages = self.history + [{"role": "user", "content": text}]
        answer = self.reply(messages, stream or None)
        self.history = messages + [{"role": "assistant", "content": answer}]
        return answer


def _stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    s = parse_overrides(sys.argv[1:] if argv is None else argv, ChatSettings, positional="path")
    if not s.path:
        print("error: path=<model folder> is required, e.g. python -m pipeline.chat path=outputs/demo/ppo/final/actor",
              file=sys.stderr)
        return 2
    if s.format not in ("text", "jsonl"):
        print(f"error: format={s.format}: must be text or jsonl", file=sys.stderr)
        return 2
    looks_local = s.path.startswith(("/", ".", "~")) or s.path.count("/") != 1
    if looks_local and not Path(s.path).expanduser().exists():
        print(f"error: path={s.path}: no such folder", file=sys.stderr)
        return 2
    try:
        session = ChatSession(**dataclasses.asdict(s))
    except Exception as err:  # noqa: BLE001 - one line, not a traceback
        from pipeline.models import ModelUnavailable

        if isinstance(err, (ModelUnavailable, OSError, ValueError)):
            print(f"error: cannot load {s.path}: {err}", file=sys.stderr)
            return 2
        raise
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {s.path} ({session.prompt_format} format). "
              "'clear' starts over, 'quit' leaves.", file=sys.stderr, flush=True)
    turn = 0
    while True:
        try:
            line = input("Human: ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break  # end of input
        text = line.strip()
        if not text:
            continue
        if text.lower() == "quit":
            break
        if text.lower() == "clear":
            session.clear()
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        turn += 1
        if s.format == "jsonl":
            answer = session.ask(text)
            print(json.dumps({"turn": turn, "prompt": text, "answer": answer}), flush=True)
            continue
        if interactive:
            _stdout_writer("Assistant: ")
            write = _stdout_writer
        else:
            def write(piece: str) -> None:
                _stdout_writer(piece.replace("\r", "").replace("\n", "\\n"))
        answer = session.ask(text, stream=write if s.stream else None)
        if not s.stream:
            write(answer)
        _stdout_writer("\n\n" if interactive else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Talk to a trained model: `python -m pipeline.chat path=<run>/ppo/final/actor [key=value ...]`.

    python -m pipeline.chat path=outputs/demo/ppo/final/actor
    python -m pipeline.chat path=outputs/demo/ppo/final/actor temperature=0 max_new_tokens=64
    printf 'what color is the cat ?\\nquit\\n' | python -m pipeline.chat path=... temperature=0
    python -m pipeline.chat --help                  # every option, its default and what it does

Multi-turn, in the format the model was trained on: "\\n\\nHuman: ...\\n\\nAssistant:" (DeepSpeed-Chat's),
or the tokenizer's chat template when the run used data_blend.prompt_format=chat_template (read
from the run's config.yaml; `prompt_format=` overrides). Tokens stream as they come; generation
stops at eos or at the next turn ("Human:", or the chat template's end-of-turn marker), and the
answer is cut there. `clear` resets the conversation, `quit` (or end of input) leaves.

Piped stdin (not a terminal): one output line per input line that is not a command, the answer
only (its newlines written as "\\n"); `format=jsonl` writes {"turn","prompt","answer"} lines.

Options are key=value (DeepSpeed-Chat's --path / --max_new_tokens spellings work too), typed by
`ChatSettings`; an unknown or mistyped one stops with one line naming it.

Python API:
    from pipeline.chat import ChatSession
    chat = ChatSession("outputs/demo/ppo/final/actor", temperature=0)
    chat.ask("what color is the cat ?")       # -> "the cat is red ."
    chat.ask("and the dog ?"); chat.clear()
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from pipeline.config import ConfigError, RunConfig, load_run_config
from pipeline.errors import USER_ERROR_EXIT_CODE, UserError

# The turn markers of the "Human: ... Assistant:" format: an answer ends where the model starts one.
HUMAN_ASSISTANT_MARKERS = ("Human:", "Assistant:")


# --------------------------------------------------------------------------- options


def option(default: Any, help: str, choices: Sequence[str] = ()) -> Any:
    """A settings field with its help line (for --help) and, when given, the values it may take."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices)})


def settings_from(cls: type, values: dict | DictConfig) -> Any:
    """Typed settings: `values` merged into the dataclass `cls` by OmegaConf (types converted and
    checked). An unknown option, a wrong type or a value outside its choices raises ConfigError
    with one line naming the option (and the closest known one)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        settings = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise ConfigError(_unknown_option(str(err.full_key or err.key), cls)) from None
    except ValidationError as err:
        raise ConfigError(f"{err.full_key}={err.value}: expected {_type_name(cls, str(err.key))} "
                          f"({err.msg.splitlines()[0]})") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{getattr(err, 'full_key', None) or '?'}: {str(err).splitlines()[0]}") from None
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        value = getattr(settings, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{f.name}={value}: must be one of {', '.join(choices)}")
    return settings


def _unknown_option(key: str, cls: type) -> str:
    known = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown option {key!r} ({hint})"


def _type_name(cls: type, name: str) -> str:
    hint = typing.get_type_hints(cls).get(name)
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(args[0], str(hint))


def option_args(argv: Sequence[str]) -> list[str]:
    """Command-line words as key=value items: `--key value` and `--key=value` (argparse style),
    `+key=value` (Hydra style) and `key-name=value` become `key=value`; bare words stay as they are."""
    items: list[str] = []
    words = list(argv)
    while words:
        word = words.pop(0)
        if word.startswith("--"):
            word = word[2:]
            if "=" not in word:
                if not words:
                    raise ConfigError(f"--{word} needs a value (--{word} VALUE or {word}=VALUE)")
                word = f"{word}={words.pop(0)}"
        if "=" in word:
            key, value = word.split("=", 1)
            word = f"{key.lstrip('+').replace('-', '_')}={value}"
        items.append(word)
    return items


def parse_options(argv: Sequence[str], cls: type, positional: str | None = None) -> Any:
    """`key=value` words (see option_args) -> typed `cls` settings, through OmegaConf.from_dotlist.

    A bare word fills `positional` (once). Text options keep what was typed, even when it reads
    as YAML (`system=Be brief: answer in one line` stays one string)."""
    dotlist, raw = [], {}
    for item in option_args(argv):
        if "=" not in item:
            if not positional or positional in raw:
                raise ConfigError(f"{item!r}: expected key=value (--help lists the options)")
            item = f"{positional}={item}"
        key, value = item.split("=", 1)
        dotlist.append(item)
        raw[key] = value
    try:
        values = OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{' '.join(dotlist)}: {str(err).splitlines()[0]}") from None
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if key in values and isinstance(values[key], (DictConfig, ListConfig)) and str in _hint_types(hints.get(key)):
            values[key] = value
    return settings_from(cls, values)


def _hint_types(hint: Any) -> tuple:
    return typing.get_args(hint) or (hint,)


def options_help(cls: type, usage: str) -> str:
    """`usage`, then one line per option: name, default, what it does (and its choices)."""
    lines = [usage, "", "options (key=value; --key value works too):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        choices = f" ({' | '.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
        lines.append(f"  {f.name:<19} {shown:<9} {f.metadata.get('help', '')}{choices}")
    return "\n".join(lines)


@dataclass
class ChatSettings:
    path: Optional[str] = option(None, "model folder (Hugging Face format) or hub id; required")
    max_new_tokens: int = option(128, "longest answer, in tokens")
    temperature: float = option(0.7, "sampling temperature; 0 = greedy")
    top_p: float = option(0.9, "nucleus sampling share")
    top_k: int = option(0, "sample from the k likeliest tokens; 0 = off")
    repetition_penalty: float = option(1.0, "1.0 = off")
    seed: Optional[int] = option(None, "sampling seed; null = not seeded")
    system: Optional[str] = option(None, "a system message put before the conversation")
    prompt_format: str = option("auto", "auto = the run's data_blend.prompt_format (its config.yaml), else "
                                "human_assistant", ("auto", "human_assistant", "chat_template"))
    device: str = option("auto", "auto (cuda when there is one), cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto = bf16 on a GPU that has it, else fp32", ("auto", "fp32", "bf16", "fp16"))
    stream: bool = option(True, "show the answer's tokens as they come")
    format: str = option("text", "piped output: the answer a line, or {turn, prompt, answer} rows", ("text", "jsonl"))
    trust_remote_code: bool = option(False, "run the model's own code from the hub (only for models you trust)")


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


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a model folder belongs to (<run>/ppo/final/actor -> <run>): the nearest of it
    and its 4 parents holding the runner's config.yaml and plan.json; None for other models."""
    p = Path(path).expanduser()
    if not p.exists():
        return None
    p = p.resolve()
    for folder in [p, *list(p.parents)[:4]]:
        if (folder / "config.yaml").is_file() and (folder / "plan.json").is_file():
            return folder
    return None


def run_config_of(path: str | Path) -> RunConfig | None:
    """The typed config of the run a model folder belongs to (ConfigError naming its config.yaml
    when that is damaged), or None when the model is not part of a run."""
    folder = run_folder_of(path)
    return load_run_config(folder) if folder else None


def resolve_prompt_format(path: str | Path, prompt_format: str = "auto") -> str:
    """The prompt format to talk to the model at `path` in: as given, else its run's."""
    if prompt_format != "auto":
        return prompt_format
    cfg = run_config_of(path)
    return cfg.data_blend.prompt_format if cfg else "human_assistant"


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


# --------------------------------------------------------------------------- where an answer ends


def special_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (added ones too), longest first."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted(found, key=len, reverse=True)


def turn_markers(tokenizer, prompt_format: str) -> tuple[str, ...]:
    """What opens the next turn: "Human:" / "Assistant:", or for a chat template the first mark it
    writes between an assistant's answer and the next user turn (its end-of-turn token, e.g.
    <|im_end|>, <|eot_id|>, <end_of_turn>; "Human:" for the built-in tokenizer's template)."""
    if prompt_format != "chat_template":
        return HUMAN_ASSISTANT_MARKERS
    from pipeline.data import format_prompt

    probe = [{"role": "user", "content": "QQQ1"}, {"role": "assistant", "content": "AAA1"},
             {"role": "user", "content": "QQQ2"}]
    text = format_prompt(probe, tokenizer, "chat_template")  # DataError when there is no template
    between = text.split("AAA1", 1)[-1].split("QQQ2", 1)[0].split() if "AAA1" in text else []
    if not between:  # the template writes nothing between turns: eos is the only end
        return ()
    first = between[0]
    return (next((s for s in special_tokens(tokenizer) if first.startswith(s)), first),)


def marker_pattern(markers: Sequence[str]) -> re.Pattern | None:
    """A regex finding any of the markers, with any spacing between their words and signs."""
    if not markers:
        return None
    return re.compile("|".join(r"\s*".join(map(re.escape, re.findall(r"\w+|[^\w\s]+", m))) for m in markers))


def _squeeze(text: str) -> str:
    return "".join(text.split())


class TurnMarkers:
    """Where an answer ends, for one tokenizer and prompt format (see turn_markers): the markers stop
    generation (transformers' stop strings) and the answer is cut before the first of them.
    Between words of a marker any spacing counts ("Human :" as a word-level tokenizer decodes it)."""

    def __init__(self, tokenizer, prompt_format: str):
        self.tokenizer = tokenizer
        self.strings = turn_markers(tokenizer, prompt_format)
        self.pattern = marker_pattern(self.strings)
        self.squeezed = [_squeeze(m) for m in self.strings]
        specials = special_tokens(tokenizer)
        # A marker that is a special token (<|im_end|>) is only seen when special tokens are decoded;
        # they are then taken out of the answer's text by hand.
        self.specials = specials if any(s in m for m in self.strings for s in specials) else []
        self.decode_kwargs = {"skip_special_tokens": not self.specials}
        self.native = self._stop_strings_supported()

    def _stop_strings_supported(self) -> bool:
        """Whether transformers' stop strings can read this vocabulary: it spells a probe text with
        it, which word-level vocabularies such as the built-in one cannot (transformers #48320)."""
        from transformers import StopStringCriteria

        if not self.strings:
            return False
        try:
            StopStringCriteria(self.tokenizer, list(self.strings))  # transformers caches the tables it builds
        except ValueError:
            return False
        return True

    def stop_kwargs(self, prompt_len: int) -> dict:
        """generate() arguments that stop each row at its first marker after the prompt."""
        if not self.strings:
            return {}
        if self.native:
            return {"stop_strings": list(self.strings), "tokenizer": self.tokenizer}
        return {"stopping_criteria": StoppingCriteriaList([_MarkerInTail(self, prompt_len)])}

    def visible(self, text: str, final: bool = True) -> str:
        """The answer in decoded text: up to the first marker, without special tokens, stripped.
        Not final (still streaming): a tail that may grow into a marker ("Hu", "Human") is held back."""
        found = self.pattern.search(text) if self.pattern else None
        if found:
            text = text[: found.start()]
        elif not final:
            text = text[: self.held_from(text)]
        for special in self.specials:
            text = text.replace(special, "")
        return text.strip()

    def held_from(self, text: str) -> int:
        """Where the longest tail of `text` that could still become a marker starts (len(text): none)."""
        longest = 2 * max((len(m) for m in self.strings), default=0)
        for i in range(max(0, len(text) - longest), len(text)):
            tail = _squeeze(text[i:])
            if tail and not text[i].isspace() and any(m.startswith(tail) for m in self.squeezed):
                return i
        return len(text)

    def answer(self, ids: Sequence[int]) -> str:
        """The answer's text from its token ids."""
        return self.visible(self.tokenizer.decode(list(ids), **self.decode_kwargs))


class _MarkerInTail(StoppingCriteria):
    """Stop strings for vocabularies transformers cannot read: a row is done once the text of its
    last few new tokens (a marker's length, plus two) holds a marker; the answer is never decoded whole."""

    def __init__(self, turns: TurnMarkers, prompt_len: int):
        self.turns, self.prompt_len = turns, prompt_len
        encode = turns.tokenizer
        self.window = 2 + max(len(encode(m, add_special_tokens=False).input_ids) for m in turns.strings)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = self.turns.tokenizer.batch_decode(input_ids[:, start:], **self.turns.decode_kwargs)
        return torch.tensor([bool(self.turns.pattern.search(t)) for t in tails], device=input_ids.device)


def cut_answer(text: str, markers: Sequence[str] = HUMAN_ASSISTANT_MARKERS) -> str:
    """The answer in `text` up to the next turn marker ("Human:" / "Assistant:"), stripped."""
    pattern = marker_pattern(markers)
    found = pattern.search(text) if pattern else None
    return (text[: found.start()] if found else text).strip()


class AnswerStreamer(TextStreamer):
    """Writes an answer as transformers decodes it (TextStreamer's word-by-word rules), never a turn
    marker: text that may be the start of one is held back until the next tokens tell, and nothing
    from a marker on is written. The pieces, joined, are the answer ChatSession.ask returns."""

    def __init__(self, turns: TurnMarkers, write: Callable[[str], None]):
        super().__init__(turns.tokenizer, skip_prompt=True, **turns.decode_kwargs)
        self.turns, self.write = turns, write
        self.text = ""
        self.shown = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text
        visible = self.turns.visible(self.text, final=stream_end)
        if visible.startswith(self.shown) and len(visible) > len(self.shown):
            self.write(visible[len(self.shown):])
            self.shown = visible


# --------------------------------------------------------------------------- generation


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
                   turns: TurnMarkers | None = None) -> list[list[int]]:
    """Answers (token ids, through the first eos when there is one) to tokenized prompts.

    Prompts are left-padded into one batch; `stream` (a streamer) only for a batch of one.
    turns: also stop each row at its next turn marker (turns.answer cuts the text there).
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    stop = turns.stop_kwargs(width) if turns else {}
    out = model.generate(input_ids=ids, attention_mask=mask, streamer=stream, **stop,
                         **generation_kwargs(settings, tokenizer))
    answers = []
    for row in out[:, width:].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        while row and row[-1] == pad != eos:  # a row stopped at a marker waits, padded, for the others
            row.pop()
        answers.append(row)
    return answers


class ChatSession:
    """A multi-turn conversation with one model. `ask(text)` returns the answer and remembers it.

    Settings are ChatSettings' options, checked the same way as on the command line."""

    def __init__(self, path: str | Path | None = None, model=None, tokenizer=None, **settings: Any):
        self.settings: ChatSettings = settings_from(ChatSettings, {**settings, "path": None if path is None else str(path)})
        s = self.settings
        if model is None:
            if not s.path:
                raise ConfigError("ChatSession needs a model path (or model= and tokenizer=)")
            model, tokenizer = load_policy(s.path, s.device, s.dtype, s.trust_remote_code)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt_format = resolve_prompt_format(s.path or "", s.prompt_format)
        self.turns = TurnMarkers(tokenizer, self.prompt_format)
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
        streamer = AnswerStreamer(self.turns, stream) if stream else None
        answer_ids = generate_batch(self.model, self.tokenizer, [self.prompt_ids(messages)], self.settings, streamer,
                                    self.turns)[0]
        return self.turns.answer(answer_ids)

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
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(options_help(ChatSettings, __doc__.rstrip()))
        return 0
    try:
        s = parse_options(args, ChatSettings, positional="path")
        if not s.path:
            raise ConfigError("path=<model folder> is required, e.g. python -m pipeline.chat "
                              "path=outputs/demo/ppo/final/actor")
        looks_local = s.path.startswith(("/", ".", "~")) or s.path.count("/") != 1
        if looks_local and not Path(s.path).expanduser().exists():
            raise ConfigError(f"path={s.path}: no such folder")
        try:
            session = ChatSession(**dataclasses.asdict(s))
        except (OSError, ValueError) as err:  # from_pretrained on a folder that holds no model
            if isinstance(err, UserError):
                raise
            raise ConfigError(f"path={s.path}: cannot load a model from it ({str(err).splitlines()[0]})") from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
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

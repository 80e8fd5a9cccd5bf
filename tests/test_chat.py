"""Chat: piped stdin, the Python API, options (typed, refused with one line), and where an answer
ends: generation stops at the next turn marker, the answer is cut before it, and the stream never
shows it. Models that must write a given answer are tiny random OPTs whose generation config
biases them (transformers' sequence_bias) towards that text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPT_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "opt"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_PROGRESS": "0"}


def chat_cli(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.chat", *args], cwd=ROOT, env=ENV, input=stdin,
                          capture_output=True, text=True, timeout=300)


def scripted_model(tokenizer, prompt_ids: list[int], script: str, out: Path) -> list[int]:
    """Save to `out` a tiny random OPT (2 layers, hidden 64) that greedily answers `prompt_ids` with
    `script`: each script token gets +100 after the two tokens before it (generation_config's
    sequence_bias). Returns the script's token ids."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                     num_attention_heads=4, max_position_embeddings=256,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id))
    script_ids = tokenizer(script, add_special_tokens=False).input_ids
    seq = prompt_ids[-2:] + script_ids
    model.generation_config.sequence_bias = [[seq[i - 2: i + 1], 100.0] for i in range(2, len(seq))]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return script_ids


def builtin_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from pipeline.data.builtin import save_tokenizer

    return AutoTokenizer.from_pretrained(save_tokenizer(folder))


def opt_tokenizer():
    from transformers import AutoTokenizer

    if not OPT_TOKENIZER.is_dir():
        pytest.skip(f"{OPT_TOKENIZER} is not here")
    return AutoTokenizer.from_pretrained(OPT_TOKENIZER)


# --------------------------------------------------------------------------- a trained run


def test_chat_over_piped_stdin(demo_run: Path):
    actor = demo_run / "ppo" / "final" / "actor"
    proc = chat_cli("what color is the cat ?\n\nclear\nwhere does the dog live ?\nquit\nwhat color is the cow ?\n",
                    f"path={actor}", "temperature=0", "max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    # One answer per question line; `clear` answers nothing; nothing after `quit`.
    assert len(lines) == 2, proc.stdout
    assert all(line.strip() for line in lines)
    assert "conversation cleared" in proc.stderr
    # jsonl output, and DeepSpeed-Chat's --path spelling; end of input ends the session too.
    proc = chat_cli("what color is the cat ?\nand the dog ?\n", "--path", str(actor), "format=jsonl",
                    "temperature=0", "max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2] and rows[1]["prompt"] == "and the dog ?"
    assert all(isinstance(r["answer"], str) for r in rows)


def test_chat_session_api_multi_turn_and_streaming(demo_run: Path):
    from pipeline.chat import ChatSession
    from pipeline.data import format_prompt

    chat = ChatSession(demo_run / "ppo" / "final" / "actor", temperature=0, max_new_tokens=5)
    assert chat.prompt_format == "human_assistant"  # read from the run's config.yaml
    assert chat.turns.strings == ("Human:", "Assistant:")
    pieces: list[str] = []
    first = chat.ask("what color is the cat ?", stream=pieces.append)
    assert first and "".join(pieces) == first
    second = chat.ask("where does the dog live ?")
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert chat.history[1]["content"] == first and chat.history[3]["content"] == second
    # The prompt of the next turn is the training format over the whole conversation.
    messages = chat.history + [{"role": "user", "content": "what color is the cow ?"}]
    expected = chat.tokenizer(format_prompt(messages, chat.tokenizer, "human_assistant")).input_ids
    assert chat.prompt_ids(messages) == expected
    chat.clear()
    assert chat.history == []
    assert chat.ask("what color is the cat ?") == first  # greedy: same start, same answer


# --------------------------------------------------------------------------- options


def test_options_are_typed_and_refused_with_one_line(capsys):
    from pipeline.chat import ChatSession, ChatSettings, main, parse_options
    from pipeline.config import ConfigError

    s = parse_options(["a/b", "--max_new_tokens", "7", "temperature=0", "seed=null", "stream=false",
                       "--top-p=0.5", "system=Be brief: one line, no more"], ChatSettings, positional="path")
    assert (s.path, s.max_new_tokens, s.temperature, s.seed, s.stream, s.top_p) == ("a/b", 7, 0.0, None, False, 0.5)
    assert isinstance(s.temperature, float) and s.system == "Be brief: one line, no more"
    refusals = {("temprature=1",): "unknown option 'temprature' (did you mean 'temperature'?)",
                ("temperature=hot",): "temperature=hot: expected a number",
                ("max_new_tokens=1.5",): "max_new_tokens=1.5: expected an integer",
                ("format=xml",): "format=xml: must be one of text, jsonl",
                ("prompt_format=chatml",): "prompt_format=chatml: must be one of auto, human_assistant, chat_template",
                ("path=a", "b"): "'b': expected key=value",
                ("--stream",): "--stream needs a value"}
    for args, message in refusals.items():
        with pytest.raises(ConfigError) as err:
            parse_options(list(args), ChatSettings, positional="path")
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)
    # The Python API checks its settings the same way.
    with pytest.raises(ConfigError, match="unknown option 'max_tokens' \\(did you mean 'max_new_tokens'\\?\\)"):
        ChatSession("x", max_tokens=3)
    # --help lists every option with its default.
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for name in ("path", "max_new_tokens", "temperature", "prompt_format", "format", "trust_remote_code"):
        assert f"\n  {name} " in shown, name
    assert "auto | human_assistant | chat_template" in shown


def test_chat_command_errors_are_one_line(tmp_path: Path):
    proc = chat_cli("", f"path={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: path={tmp_path / 'nothing'}: no such folder"
    proc = chat_cli("", "path=x", "temprature=1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown option 'temprature' (did you mean 'temperature'?)"
    proc = chat_cli("", f"path={tmp_path}")  # a folder with no model in it
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and str(tmp_path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- where an answer ends


def test_cut_answer_and_streamer_hold_back_the_marker(tmp_path: Path):
    import torch

    from pipeline.chat import AnswerStreamer, TurnMarkers, cut_answer

    assert cut_answer(" Paris is the capital.\n\nHuman: and Spain?") == "Paris is the capital."
    assert cut_answer("the cat is red . Human : what") == "the cat is red ."
    assert cut_answer("no marker here ") == "no marker here"
    tok = builtin_tokenizer(tmp_path / "tok")
    turns = TurnMarkers(tok, "human_assistant")
    shown: list[str] = []
    streamer = AnswerStreamer(turns, shown.append)
    streamer.put(tok("prompt", return_tensors="pt").input_ids)  # the prompt is not shown
    for word in "the cat is red . Human : what color".split():
        streamer.put(torch.tensor(tok(word, add_special_tokens=False).input_ids))
        assert "H" not in "".join(shown)  # "Human" may start a marker: held back as soon as it comes
    streamer.end()
    assert "".join(shown) == "the cat is red ."
    # Held text that does not become a marker is shown once the next token says so.
    assert turns.visible("the cat is red . Hu", final=False) == "the cat is red ."
    assert turns.visible("the cat is red . Hungry", final=False) == "the cat is red . Hungry"


@pytest.mark.parametrize("vocabulary", ["opt", "builtin"])
def test_generation_stops_at_the_next_human_turn(vocabulary: str, tmp_path: Path):
    """OPT's byte-level BPE goes through transformers' stop strings; the built-in word-level
    vocabulary cannot (transformers builds its stop tables from a probe text it cannot spell) and
    takes the windowed fallback. Either way generation ends on the marker's last token."""
    from pipeline.chat import ChatSession, generate_batch

    if vocabulary == "opt":
        tok = opt_tokenizer()
        script, answer = " Paris is the capital.\n\nHuman: and Spain? It is Madrid.", "Paris is the capital."
    else:
        tok = builtin_tokenizer(tmp_path / "tok")
        script, answer = " the cat is red . Human : what color is the dog ?", "the cat is red ."
    prompt = tok("\n\nHuman: hi\n\nAssistant:").input_ids
    script_ids = scripted_model(tok, prompt, script, tmp_path / "model")
    chat = ChatSession(tmp_path / "model", temperature=0, max_new_tokens=30)
    assert chat.prompt_ids([{"role": "user", "content": "hi"}]) == prompt
    assert chat.turns.native == (vocabulary == "opt")
    pieces: list[str] = []
    assert chat.ask("hi", stream=pieces.append) == answer
    assert "".join(pieces) == answer and not any("Human" in p or ":" in p for p in pieces)
    # Generation stopped on the ":" of "Human:", 20-odd tokens before max_new_tokens.
    generated = generate_batch(chat.model, chat.tokenizer, [prompt], chat.settings, turns=chat.turns)[0]
    colon = tok.convert_ids_to_tokens(script_ids).index(":")
    assert generated == script_ids[: colon + 1]
    # Without turn markers (reward scoring, as in PPO) the model writes on, past "Human:".
    assert generate_batch(chat.model, chat.tokenizer, [prompt], chat.settings)[0][: len(script_ids)] == script_ids


def test_chat_template_turn_marker_stops_and_cuts(tmp_path: Path):
    """prompt_format=chat_template: the marker is the template's end-of-turn token (a special token,
    so answers are decoded with special tokens kept, cut there, and the rest taken out)."""
    from pipeline.chat import ChatSession, generate_batch

    tok = opt_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    prompt = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    script_ids = scripted_model(tok, prompt, "Paris is the capital.<|im_end|>\n<|im_start|>user\nAnd Spain?",
                                tmp_path / "model")
    chat = ChatSession(tmp_path / "model", temperature=0, max_new_tokens=30, prompt_format="chat_template")
    assert chat.turns.strings == ("<|im_end|>",)
    assert chat.prompt_ids([{"role": "user", "content": "hi"}]) == prompt
    pieces: list[str] = []
    assert chat.ask("hi", stream=pieces.append) == "Paris is the capital."
    assert "".join(pieces) == "Paris is the capital."
    generated = generate_batch(chat.model, chat.tokenizer, [prompt], chat.settings, turns=chat.turns)[0]
    assert generated == script_ids[: script_ids.index(tok.convert_tokens_to_ids("<|im_end|>")) + 1]

"""Chat and evaluation on a tiny trained run: piped stdin, the Python API, stop rules, and the
evaluate commands (compare, rm, reward)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["+experiment=demo", "stage.sft.max_steps=15", "stage.rm.max_steps=10", "stage.ppo.max_steps=1",
        "stage.ppo.generation.max_new_tokens=8", "data_blend.datasets.0.max_records=800"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_PROGRESS": "0"}


def tiny_trained_run(tmp_path_factory) -> Path:
    """A tiny SFT -> RM -> PPO run, made once per test session (other files reuse the folder)."""
    out = tmp_path_factory.getbasetemp() / "issue8_tiny_run"
    if not (out / "results.json").exists():
        proc = subprocess.run([sys.executable, "-m", "pipeline", *TINY, f"run.output_dir={out}"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_trained_run(tmp_path_factory)


def chat_cli(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.chat", *args], cwd=ROOT, env=ENV, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_chat_over_piped_stdin(run: Path):
    actor = run / "ppo" / "final" / "actor"
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


def test_chat_errors_are_one_line(tmp_path: Path):
    proc = chat_cli("", f"path={tmp_path / 'nothing'}")
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = chat_cli("", "path=x", "temprature=1")
    assert proc.returncode != 0 and "unknown setting 'temprature'" in proc.stderr


def test_chat_session_api_multi_turn_and_streaming(run: Path):
    from pipeline.chat import ChatSession
    from pipeline.data import format_prompt

    chat = ChatSession(run / "ppo" / "final" / "actor", temperature=0, max_new_tokens=5)
    assert chat.prompt_format == "human_assistant"  # read from the run's config.yaml
    pieces: list[str] = []
    first = chat.ask("what color is the cat ?", stream=pieces.append)
    assert isinstance(first, str) and "".join(pieces) == first
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


def test_answer_stops_at_the_next_human_turn(run: Path):
    from transformers import AutoTokenizer

    from pipeline.chat import _AnswerStreamer, cut_answer, parse_overrides, ChatSettings

    assert cut_answer(" Paris is the capital.\n\nHuman: and Spain?") == "Paris is the capital."
    assert cut_answer("the cat is red . Human : what") == "the cat is red ."
    tok = AutoTokenizer.from_pretrained(run / "ppo" / "final" / "actor")
    shown: list[str] = []
    streamer = _AnswerStreamer(tok, shown.append)
    streamer.put(tok("prompt", return_tensors="pt").input_ids)  # the prompt is not shown
    for word in "the cat is red . Human : what color".split():
        streamer.put(tok(word, add_special_tokens=False, return_tensors="pt").input_ids[0])
    streamer.end()
    assert "".join(shown) == "the cat is red ."
    s = parse_overrides(["path=a", "--max_new_tokens", "7", "temperature=0", "seed=null", "stream=false"], ChatSettings)
    assert (s.path, s.max_new_tokens, s.temperature, s.seed, s.stream) == ("a", 7, 0.0, None, False)


def test_evaluate_rm_reward_and_compare(run: Path, tmp_path: Path, shared_data_dir=None):
    from pipeline.evaluate import EvalSettings, compare, reward_eval, rm_eval

    # The reward model on the run's own held-out pairs reproduces the stage's accuracy.
    result = rm_eval(EvalSettings(run=str(run), device="cpu"))
    stage = json.loads((run / "results.json").read_text())["rm"]
    assert result["accuracy"] == pytest.approx(stage["accuracy_after"])
    assert result["chosen_score"] == pytest.approx(stage["chosen_score"], abs=1e-4)
    # Pairs from a file (the same format data_blend=local reads).
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"what color is the {s} ?", "chosen": f"the {s} is red .",
                                         "rejected": "bee bee bee"}) + "\n" for s in ("cat", "dog", "cow")))
    result = rm_eval(EvalSettings(rm=str(run / "rm" / "final"), data=str(pairs), device="cpu"))
    assert result["pairs"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    # Reward of two policies' answers on the held-out PPO prompts.
    result = reward_eval(EvalSettings(run=str(run), limit=4, batch_size=4, max_new_tokens=4, device="cpu",
                                      out=str(tmp_path / "reward.json")))
    assert set(result["models"]) == {"sft/final", "ppo/final/actor"}
    assert all(r["n"] == 4 and r["mean_answer_length"] <= 4 for r in result["models"].values())
    assert json.loads((tmp_path / "reward.json").read_text())["models"]
    # Side by side answers to prompts from an MT-Bench style file, two turns.
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 7, "category": "animals",
                                     "turns": ["what color is the cat ?", "where does it live ?"]}) + "\n")
    rows = compare(EvalSettings(run=str(run), prompts=str(questions), turns="all", max_new_tokens=4, device="cpu",
                                out=str(tmp_path / "compare.md")))
    assert len(rows) == 1 and len(rows[0]["a"]) == 2 and len(rows[0]["b"]) == 2
    assert "| 7.2 |" in (tmp_path / "compare.md").read_text()

"""pipeline.evaluate on the demo run: rm on the run's held-out pairs and on any data the pipeline
trains on (a data_blend with a field mapping gives the same numbers as the same pairs in
prompt/chosen/rejected columns, and the drops are counted by reason), reward, compare (prompt
files and message-list data), and its options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def rm_cli(*args: str) -> list[str]:
    return ["rm", *args, "device=cpu"]


def test_rm_on_the_runs_held_out_pairs_reproduces_the_stage(demo_run: Path):
    from pipeline.evaluate import EvalSettings, rm_eval

    result = rm_eval(EvalSettings(run=str(demo_run), device="cpu"))
    stage = json.loads((demo_run / "results.json").read_text())["rm"]
    assert result["accuracy"] == pytest.approx(stage["accuracy_after"])
    assert result["chosen_score"] == pytest.approx(stage["chosen_score"], abs=1e-4)
    assert result["rejected_score"] == pytest.approx(stage["rejected_score"], abs=1e-4)


def test_rm_on_two_answers_and_a_label_equals_prompt_chosen_rejected(demo_run: Path, tmp_path: Path, capsys):
    from pipeline.config import load_run_config
    from pipeline.data.builtin import generate_pairs
    from pipeline.evaluate import main

    # 60 pairs of the run's own made-up world, in two schemas: answer_a/answer_b + a label saying
    # which won (half each way, "0" and "b"), and prompt/chosen/rejected.
    pairs = generate_pairs(60, seed=load_run_config(demo_run).run.seed)
    labelled = [{"q": p["prompt"], "x": p["chosen"], "y": p["rejected"], "pref": "0"} if i % 2 else
                {"q": p["prompt"], "x": p["rejected"], "y": p["chosen"], "pref": "b"} for i, p in enumerate(pairs)]
    # What training drops, it drops too: ties, equal answers, a prompt longer than the run's max_prompt_len (32).
    labelled += [{"q": "what color is the cat ?", "x": "the cat is red .", "y": "the cat is blue .", "pref": "tie"}] * 3
    labelled += [{"q": "what color is the cat ?", "x": "the cat is red .", "y": "the cat is red .", "pref": "0"}] * 2
    labelled += [{"q": " ".join(["cat"] * 40), "x": "the cat is red .", "y": "bee bee", "pref": "0"}]
    (tmp_path / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rm = f"rm={demo_run / 'rm' / 'final'}"

    assert main(rm_cli(rm, f"data_blend.path={tmp_path / 'labelled.jsonl'}", "data_blend.fields.prompt=q",
                       "data_blend.fields.answer_a=x", "data_blend.fields.answer_b=y", "data_blend.fields.label=pref",
                       f"out={tmp_path / 'labelled.json'}")) == 0
    printed = capsys.readouterr().out
    assert f"local [{tmp_path / 'labelled.jsonl'}]: read 66, kept 60; dropped 6: chosen == rejected 2, " \
           "prompt too long 1, tie 3" in printed
    assert main(rm_cli(rm, "data_blend=local", f"data_blend.path={tmp_path / 'pairs.jsonl'}",
                       f"out={tmp_path / 'pairs.json'}")) == 0
    assert "read 60, kept 60; dropped 0: none" in capsys.readouterr().out

    labelled_result = json.loads((tmp_path / "labelled.json").read_text())
    plain_result = json.loads((tmp_path / "pairs.json").read_text())
    assert labelled_result["pairs"] == plain_result["pairs"] == 60
    assert labelled_result["datasets"][0]["dropped"] == {"tie": 3, "chosen == rejected": 2, "prompt too long": 1}
    # The same pairs, the same tokens: the same accuracy and scores, to the last digit.
    for key in ("accuracy", "chosen_score", "rejected_score", "margin"):
        assert labelled_result[key] == plain_result[key], key
    assert labelled_result["accuracy"] >= 0.8  # the demo's reward model knows its world
    # data=FILE is the short form of data_blend=local data_blend.path=FILE.
    assert main(rm_cli(rm, f"data={tmp_path / 'pairs.jsonl'}", f"out={tmp_path / 'short.json'}")) == 0
    assert json.loads((tmp_path / "short.json").read_text())["accuracy"] == plain_result["accuracy"]


def test_reward_and_compare_on_the_run(demo_run: Path, tmp_path: Path):
    from pipeline.evaluate import EvalSettings, compare, reward_eval

    # Reward of two policies' answers on the held-out PPO prompts.
    result = reward_eval(EvalSettings(run=str(demo_run), limit=4, batch_size=4, max_new_tokens=4, device="cpu",
                                      out=str(tmp_path / "reward.json")))
    assert set(result["models"]) == {"sft/final", "ppo/final/actor"}
    assert all(r["n"] == 4 and r["mean_answer_length"] <= 4 for r in result["models"].values())
    assert json.loads((tmp_path / "reward.json").read_text())["models"]
    # Side by side answers to prompts from an MT-Bench style file, two turns.
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 7, "category": "animals",
                                     "turns": ["what color is the cat ?", "where does it live ?"]}) + "\n")
    rows = compare(EvalSettings(run=str(demo_run), prompts=str(questions), turns="all", max_new_tokens=4, device="cpu",
                                out=str(tmp_path / "compare.md")))
    assert len(rows) == 1 and len(rows[0]["a"]) == 2 and len(rows[0]["b"]) == 2
    assert "| 7.2 |" in (tmp_path / "compare.md").read_text()


def test_compare_and_reward_on_message_lists(demo_run: Path, tmp_path: Path, capsys):
    from pipeline.evaluate import main

    conversations = [[{"role": "user", "content": "what color is the cat ?"},
                      {"role": "assistant", "content": "the cat is red ."},
                      {"role": "user", "content": f"where does the {s} live ?"},
                      {"role": "assistant", "content": f"the {s} lives in the city ."}] for s in ("dog", "cow", "fox")]
    conversations.append(conversations[0][:3])  # ends with a user turn: no answer to learn, dropped
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"conv": c}) + "\n" for c in conversations))
    data = [f"data_blend.path={tmp_path / 'chats.jsonl'}", "data_blend.fields.messages=conv"]
    assert main(["compare", f"run={demo_run}", *data, "max_new_tokens=4", "device=cpu",
                 f"out={tmp_path / 'compare.jsonl'}"]) == 0
    printed = capsys.readouterr().out
    assert "read 4, kept 3; dropped 1: conversation does not end with an assistant turn 1" in printed
    rows = [json.loads(line) for line in (tmp_path / "compare.jsonl").read_text().splitlines()]
    # The last user turn is asked, after the dialogue before it.
    assert [r["turns"] for r in rows] == [[f"where does the {s} live ?"] for s in ("dog", "cow", "fox")]
    assert all(len(r["a"]) == len(r["b"]) == 1 for r in rows)
    assert main(["reward", f"run={demo_run}", *data, "max_new_tokens=4", "device=cpu",
                 f"out={tmp_path / 'reward.json'}"]) == 0
    result = json.loads((tmp_path / "reward.json").read_text())
    assert all(r["n"] == 3 for r in result["models"].values())
    assert result["datasets"][0]["kept"] == 3


def test_options_help_and_refusals(tmp_path: Path, capsys):
    from pipeline.config import ConfigError
    from pipeline.evaluate import main, parse_command_line

    s = parse_command_line(["reward", "run=r", "models=a,b", "limit=3", "--batch-size", "2", "data_blend=builtin",
                            "data_blend.datasets.0.max_records=50"])
    assert (s.command, s.models, s.limit, s.batch_size) == ("reward", "a,b", 3, 2)
    assert [(d.name, d.max_records) for d in s.data_blend.datasets] == [("builtin", 50)]
    assert parse_command_line(["rm", "data_blend.path=x.jsonl"]).data_blend.datasets[0].path == "x.jsonl"  # local
    refusals = {("rm", "lmit=3"): "unknown option 'lmit' (did you mean 'limit'?)",
                ("rm", "limit=many"): "limit=many: expected an integer",
                ("compare", "turns=some"): "turns=some: must be one of first, all",
                ("judge",): "command=judge: must be one of compare, rm, reward",
                ("limit=3",): "name what to measure first",
                ("rm", "data_blend=nope"): "In 'config': Could not find 'data_blend/nope'; available: builtin, ",
                ("rm", "data_blend.prompt_format=chat_template"): "data_blend.prompt_format: evaluation formats "
                                                                  "the data as the model was trained"}
    for args, message in refusals.items():
        with pytest.raises(ConfigError) as err:
            parse_command_line(list(args))
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert main(["rm", "lmit=3"]) == 2
    assert capsys.readouterr().err == "error: unknown option 'lmit' (did you mean 'limit'?)\n"
    assert main(["rm", f"rm={tmp_path}", f"data={tmp_path / 'none.jsonl'}"]) == 2
    assert capsys.readouterr().err == f"error: data={tmp_path / 'none.jsonl'}: no such file or folder\n"
    assert main(["--help"]) == 0
    shown = capsys.readouterr().out
    for name in ("command", "run", "rm", "data", "data_blend", "limit", "turns", "max_prompt_len", "out"):
        assert f"\n  {name} " in shown, name

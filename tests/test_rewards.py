"""Reward functions: the registry, GSM8K exact match on the real data, the reference answers the data
layer carries to them, and the built-in verifiable task."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.rewards import (
    REWARD_FUNCTIONS,
    RewardError,
    final_answer,
    gsm8k_exact_match,
    normalize_number,
    register_reward,
)

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("12.0", "12"), ("-5", "-5"), ("+5", "5"), ("$18", "18"), ("1,234.50", "1234.5"),
    ("-0", "0"), ("0.25", "0.25"), ("007", "7"), ("abc", None), ("", None),
])
def test_numbers_are_normalised(text, expected):
    assert normalize_number(text) == expected


def test_final_answer_takes_the_last_marked_number():
    assert final_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert final_answer("#### 5 then #### 1,000.0") == "1000"
    assert final_answer("the answer is 7") is None  # no "####": not an answer
    assert gsm8k_exact_match("", "the answer is 7", "#### 7") == 0.0
    assert gsm8k_exact_match("", "#### 7.00", "#### 7") == 1.0


def corrupted(solution: str, rng: random.Random) -> str:
    """The solution with its final number changed (by 1 to 9, the sign kept)."""
    head, number = solution.rsplit("####", 1)
    value = int(normalize_number(number)) + rng.randint(1, 9)
    return f"{head}#### {value}"


@pytest.mark.skipif(not GSM8K.is_dir(), reason="needs ../shared/data/gsm8k")
def test_gsm8k_exact_match_on_the_real_data():
    rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in (GSM8K / name).open()]
    assert len(rows) == 7473 + 1319
    rng = random.Random(0)
    for row in rows:
        answer = row["answer"]
        assert gsm8k_exact_match(row["question"], answer, answer) == 1.0, answer[-40:]
        assert gsm8k_exact_match(row["question"], corrupted(answer, rng), answer) == 0.0, answer[-40:]
    # commas in the reference ("#### 1,000") match the bare number a model may write
    with_commas = [r["answer"] for r in rows if re.search(r"####\s*-?\d{1,3}(,\d{3})+\s*$", r["answer"])]
    assert with_commas
    for answer in with_commas:
        assert gsm8k_exact_match("", "#### " + answer.rsplit("####", 1)[1].replace(",", ""), answer) == 1.0


def test_reward_errors_name_the_setting():
    with pytest.raises(RewardError, match="stage.ppo.reward=gsm8k_exact_match needs each prompt's reference"):
        gsm8k_exact_match("q", "#### 1", None)
    with pytest.raises(RewardError, match="has no '#### <number>' line"):
        gsm8k_exact_match("q", "#### 1", "no number here")


def test_registering_a_reward_function_makes_it_selectable(tmp_path):
    @register_reward("test_answer_length")
    def answer_length(prompt, answer, reference):
        return float(len(answer.split()))

    try:
        base = {"run": {"output_dir": str(tmp_path), "stages": ["sft", "ppo"]},
                "model": {"actor": "tiny-opt", "reward": "tiny-opt", "tokenizer": "builtin"}}
        cfg = load_config({**base, "stage": {"ppo": {"reward": "test_answer_length"}}})
        assert cfg.stage.ppo.reward == "test_answer_length" and not cfg.stage.ppo.reward_model
        with pytest.raises(ConfigError, match=r"stage.ppo.reward=nope is not a registered reward function.*gsm8k_exact_match"):
            load_config({**base, "stage": {"ppo": {"reward": "nope"}}})
    finally:
        REWARD_FUNCTIONS.pop("test_answer_length")


@pytest.mark.skipif(not GSM8K.is_dir(), reason="needs ../shared/data/gsm8k")
def test_ppo_examples_carry_the_reference_answer(tmp_path):
    """The gsm8k adapter feeds the data layer; each ppo example (cached, memory-mapped) holds its
    solution as reference, and collate_prompts hands the references to the trainer."""
    from pipeline.data import load_stage_data
    from pipeline.data.collate import collate_prompts
    from pipeline.models import load_tokenizer

    cfg = load_config({"run": {"output_dir": str(tmp_path)}, "model": {"actor": "tiny-opt", "reward": "tiny-opt",
                                                                       "tokenizer": "builtin"},
                       "data_blend": {"datasets": [{"name": "gsm8k", "path": str(GSM8K), "max_records": 200}],
                                      "split": "1,0,1", "max_prompt_len": 512}})
    tokenizer = load_tokenizer("builtin", tmp_path)
    data = load_stage_data(cfg, "ppo", tokenizer)
    assert len(data.train) == 100 and len(data.eval) == 100  # test.jsonl is the eval pool
    solutions = {json.loads(line)["answer"].strip() for line in (GSM8K / "train.jsonl").open()}
    row = data.train[0]
    assert row["reference"] in solutions and final_answer(row["reference"]) is not None
    batch = collate_prompts([data.train[i] for i in range(3)], tokenizer.pad_token_id)
    assert batch["reference"] == [data.train[i]["reference"] for i in range(3)]
    assert load_stage_data(cfg, "ppo", tokenizer).cache == "hit"


def test_builtin_pick_task_is_deterministic_with_right_references():
    from pipeline.data.pick import POSITIONS, SFT_ERROR, generate_records

    records = generate_records(3000, seed=5)
    assert [r.chosen for r in records[:50]] == [r.chosen for r in generate_records(50, seed=5)]
    wrong_last = right_last = 0
    for r in records:
        words = r.messages[0]["content"].split()
        position, numbers = POSITIONS.index(words[3]), words[5:8]
        assert r.reference == f"#### {numbers[position]}"
        if position == len(POSITIONS) - 1:
            wrong_last += r.chosen != r.reference
            right_last += r.chosen == r.reference
        else:
            assert r.chosen == r.reference  # only the last position's demonstrations err
    share = wrong_last / (wrong_last + right_last)
    assert abs(share - SFT_ERROR * (1 - 1 / 20)) < 0.05  # the number before may equal the asked one

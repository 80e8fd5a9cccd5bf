"""Reward functions: step 3 scores answers by rule instead of with a reward model
(stage.ppo.reward=<name>). A reward function takes one row's prompt text, answer text (decoded,
special tokens dropped) and the example's reference answer (the source's answer to that prompt,
e.g. a GSM8K solution; None when the source has none) and returns a float.

Register your own before the run starts (e.g. in a module your launcher imports):

    from pipeline.rewards import register_reward

    @register_reward("shorter_is_better")
    def shorter_is_better(prompt: str, answer: str, reference: str | None) -> float:
        return -len(answer.split())

then set stage.ppo.reward=shorter_is_better.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from pipeline.errors import UserError

RewardFunction = Callable[[str, str, "str | None"], float]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}
# What a GSM8K answer's final line holds: "#### 1,234" (commas, a sign, decimals, a $ now and then).
FINAL_ANSWER = re.compile(r"####\s*([-+]?\s*\$?\s*[\d,]*\.?\d+)")


class RewardError(UserError, ValueError):
    """A reward function cannot score the data it was given."""


def register_reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator: make a function selectable as stage.ppo.reward=<name>."""
    def add(fn: RewardFunction) -> RewardFunction:
        if name == "model":
            raise ValueError("'model' names the reward model; register the function under another name")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return add


def normalize_number(text: str) -> str | None:
    """A number as one canonical string: commas, spaces and $ dropped, a + sign dropped, trailing zeros of
    a decimal dropped ("1,234.50" -> "1234.5", "12.0" -> "12", "-0" -> "0"); None when it is not a number."""
    cleaned = re.sub(r"[\s,$]", "", text).lstrip("+")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def final_answer(text: str) -> str | None:
    """The normalised number after the last "####" of a text; None when there is none."""
    found = FINAL_ANSWER.findall(text)
    return normalize_number(found[-1]) if found else None


@register_reward("gsm8k_exact_match")
def gsm8k_exact_match(prompt: str, answer: str, reference: str | None) -> float:
    """1.0 when the answer's "#### <number>" equals the reference's (numbers normalised), else 0.0;
    an answer without "#### <number>" scores 0. Also the built-in verifiable task's reward."""
    if reference is None:
        raise RewardError("stage.ppo.reward=gsm8k_exact_match needs each prompt's reference answer, but the data "
                          "has none; use a source whose records carry one (gsm8k, builtin_pick) or stage.ppo.reward=model")
    expected = final_answer(reference)
    if expected is None:
        raise RewardError(f"stage.ppo.reward=gsm8k_exact_match: the reference answer {reference[-80:]!r} has no "
                          "'#### <number>' line; check the data source (data_blend.datasets)")
    return float(final_answer(answer) == expected)


def score_texts(name: str, prompts: list[str], answers: list[str], references: list[str | None]) -> list[float]:
    """The registered function `name` over a batch of rows."""
    fn = REWARD_FUNCTIONS[name]
    return [float(fn(p, a, r)) for p, a, r in zip(prompts, answers, references, strict=True)]

"""The built-in verifiable task (data_blend name builtin_pick): no download, deterministic for a seed.

Each prompt lists three numbers and asks for the one at a position ("which number is third : 12 7 3 ?");
the answer is GSM8K-style, "#### 3", so a rule checks it (stage.ppo.reward=gsm8k_exact_match). Like
real SFT data the demonstrations are imperfect: asked for the last number, SFT_ERROR of them give the
one before it, while every record's reference, which the reward function checks against, is right.
An SFT model trained on them answers the first two positions and often not the last; the README's
RL section has what RL with the exact-match reward measured on held-out prompts.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.data.sources import Record

POSITIONS = ("first", "second", "third")
NUMBERS = [str(i) for i in range(20)]
# The demonstrations' systematic error: asked for the last number, they give the one before it this often.
SFT_ERROR = 0.7
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
WORDS = ["Human:", "Assistant:", "Human", "Assistant", ":", "which", "number", "is", "?", "####", *POSITIONS]
TOKENIZER = "builtin:pick"  # model.tokenizer value that selects this task's tokenizer


def question(numbers: list[str], position: int) -> str:
    return f"which number is {POSITIONS[position]} : {' '.join(numbers)} ?"


def generate_records(n: int, seed: int = 0) -> list[Record]:
    """n records: the question, the SFT answer (right, except that SFT_ERROR of the questions about the
    last number are answered with the one before it) and the right answer as reference; the same n and
    seed give the same list."""
    rng = random.Random(f"pick-{seed}")
    records = []
    last = len(POSITIONS) - 1
    for _ in range(n):
        numbers = [rng.choice(NUMBERS) for _ in POSITIONS]
        position = rng.randrange(len(POSITIONS))
        right = f"#### {numbers[position]}"
        demonstrated = f"#### {numbers[last - 1]}" if position == last and rng.random() < SFT_ERROR else right
        records.append(Record([{"role": "user", "content": question(numbers, position)}], demonstrated,
                              reference=right))
    return records


def save_tokenizer(path: str | Path) -> Path:
    """Write the task's word-level tokenizer (every number 0-99 one token) to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS.values(), *WORDS, *NUMBERS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"], model_max_length=512,
    )
    path = Path(path)
    tokenizer.save_pretrained(path)
    return path

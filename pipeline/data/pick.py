"""The built-in verifiable task (data_blend name builtin_pick): no download, deterministic for a seed.

Each prompt lists three numbers and asks for the one at a position ("which number is third : 12 7 3 ?");
the answer is GSM8K-style, "#### 3", so a rule checks it (stage.ppo.reward=gsm8k_exact_match). Every
record's reference, which the reward function checks against, is right.

Like real SFT data the demonstrations are imperfect, in a way chosen so that RL's contribution shows:
asked for the third number, SFT_ERROR (60%) of them give the second. Every position is still
demonstrated right often (the first two always, the third in 40% of its questions), so a model trained
on them learns to copy each position (conf/experiment/pick.yaml trains 3 epochs over 9,000 of them;
fewer left the tiny model unable to copy the third at all). What it learns for the third is the
demonstrations' mixture: about 0.6 on the second number and 0.3 on the right one. So greedy
decoding, which takes the likelier, is wrong on most third questions (greedy accuracy about 0.75 over
all positions), while sampled answers are right often enough that most groups of 8 samples hold both a
right and a wrong answer: group-normalised advantages (GRPO, RLOO) carry signal on every such prompt,
and RL with the exact-match reward only has to move probability the SFT model already gives the right
answer past one half, which flips the greedy answers too. The first design (70% wrong, 4,000 records,
4 epochs) left the right third number probability 0.04 (the same data at 60% gave 0.06: too few steps
to learn copying the third position): RL then rarely sampled it and had nothing to reinforce. An error
below one half would make the SFT model right greedily already. The README's RL section has what was
measured.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.data.sources import Record

POSITIONS = ("first", "second", "third")
NUMBERS = [str(i) for i in range(20)]
# The demonstrations' systematic error: asked for the last number, they give the one before it this often.
SFT_ERROR = 0.6
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
WORDS = ["Human:", "Assistant:", "Human", "Assistant", ":", "which", "number", "is", "?", "####", *POSITIONS]
# Part of the data cache key: raise it whenever generate_records gives other records for a seed
# (2: the third number's demonstrations 60% wrong, were 70%).
VERSION = 2
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
    """Write the task's word-level tokenizer (every word and number of the task one token) to `path`."""
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

"""The built-in preference task and tokenizer: no download, deterministic for a seed.

Each record asks about one fact of a small made-up world ("what color is the frog ?").
The chosen answer states the fact; the rejected one is objectively worse in one of six
ways: off-topic (another subject and kind of fact), a wrong fact, the wrong kind of fact
for the right subject, garbled words, cut off mid-sentence, or rambling on after the answer. A
2-layer model learns to tell them apart in a minute, so every stage shows learning:
SFT loss drops, the reward model ranks held-out pairs correctly, and PPO raises the reward
of sampled answers.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["cat", "dog", "frog", "fish", "bird", "cow", "fox", "bear", "owl", "bee", "duck", "horse"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray"]
PLACES = ["forest", "river", "desert", "city", "farm", "sea", "mountain", "cave"]
QUESTIONS = {
    "color": ["what color is the {s} ?", "tell me the color of the {s} .", "which color does the {s} have ?"],
    "place": ["where does the {s} live ?", "where can i find the {s} ?", "what is the home of the {s} ?"],
}
ANSWERS = {"color": "the {s} is {v} .", "place": "the {s} lives in the {v} ."}
REJECTION_KINDS = ("off_topic", "wrong_fact", "wrong_relation", "garbled", "truncated", "rambling")

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
# Words of the chat format and of the chat CLI's greeting, so formatted prompts have no <unk>.
FORMAT_WORDS = ["Human", "Assistant", ":", "system", "user", "hello", "hi", "you", "are", "a", "helpful", "assistant"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def world(seed: int = 0) -> dict[str, dict[str, str]]:
    """The facts: subject -> {"color": ..., "place": ...}, fixed for a seed."""
    rng = random.Random(f"world-{seed}")
    return {s: {"color": rng.choice(COLORS), "place": rng.choice(PLACES)} for s in SUBJECTS}


def generate_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n records {"prompt", "chosen", "rejected", "kind"}; the same n and seed give the same list."""
    facts = world(seed)
    values = {"color": COLORS, "place": PLACES}
    rng = random.Random(f"pairs-{seed}")
    records = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        relation = rng.choice(sorted(QUESTIONS))
        prompt = rng.choice(QUESTIONS[relation]).format(s=subject)
        chosen = ANSWERS[relation].format(s=subject, v=facts[subject][relation])
        kind = rng.choice(REJECTION_KINDS)
        if kind == "off_topic":  # another subject, another kind of fact
            other = rng.choice([s for s in SUBJECTS if s != subject])
            other_relation = "place" if relation == "color" else "color"
            rejected = ANSWERS[other_relation].format(s=other, v=facts[other][other_relation])
        elif kind == "wrong_fact":
            wrong = rng.choice([v for v in values[relation] if v != facts[subject][relation]])
            rejected = ANSWERS[relation].format(s=subject, v=wrong)
        elif kind == "wrong_relation":
            other_relation = "place" if relation == "color" else "color"
            rejected = ANSWERS[other_relation].format(s=subject, v=facts[subject][other_relation])
        elif kind == "truncated":  # stops mid-sentence
            words = chosen.split()
            rejected = " ".join(words[: rng.randint(1, len(words) - 2)])
        elif kind == "rambling":  # the right answer, then an unasked-for sentence
            other = rng.choice([s for s in SUBJECTS if s != subject])
            rejected = chosen + " " + ANSWERS[relation].format(s=other, v=facts[other][relation])
        else:
            words = chosen.split()
            rng.shuffle(words)
            rejected = " ".join(words) if words != chosen.split() else " ".join(reversed(words))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind})
    return records


def vocabulary() -> list[str]:
    words = set(FORMAT_WORDS) | set(SUBJECTS) | set(COLORS) | set(PLACES)
    for text in [*(q for qs in QUESTIONS.values() for q in qs), *ANSWERS.values()]:
        words |= {w for w in text.split() if "{" not in w}
    return list(SPECIAL_TOKENS.values()) + sorted(words)


def save_tokenizer(path: str | Path) -> Path:
    """Write the built-in word-level tokenizer to `path` (loadable with AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    # "Human:" -> "Human", ":" so hh-rlhf-style prompts tokenize without <unk>.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"], model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    path = Path(path)
    tokenizer.save_pretrained(path)
    return path

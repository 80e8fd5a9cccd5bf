"""The built-in preference task and tokenizer: no download, deterministic for a seed.

Each record asks about one fact of a small made-up world ("what color is the frog ?").
The chosen answer states the fact; the rejected one is objectively worse in one of six
ways: off-topic (another subject and kind of fact), a wrong fact, the wrong kind of fact
for the right subject, garbled words, cut off mid-sentence, or rambling on after the answer.

The world knows its facts, so answers have a ground truth, checked by rule (`judge_answer`):
an answer states the fact when its first sentence is the true one. Held out from every
stage's data: two of the four phrasings of each fact's question, one for the test and one for
validation (different ones per fact, so every phrasing and every fact is seen in training, never
together: `held_out_questions`). Half of the
facts are contested (`contested_facts`): the demonstrations of `builtin-sft` (the SFT data,
written by imperfect annotators) mostly state a decoy value for them, while the preference
pairs (`builtin`, which train the reward model) always prefer the truth and often reject the
decoy. An SFT model trained on the demonstrations is therefore wrong on those facts, and an
RL stage that follows the reward model can put it right: what every stage adds is measurable.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["cat", "dog", "frog", "fish", "bird", "cow", "fox", "bear", "owl", "bee", "duck", "horse"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray"]
PLACES = ["forest", "river", "desert", "city", "farm", "sea", "mountain", "cave"]
VALUES = {"color": COLORS, "place": PLACES}
QUESTIONS = {
    "color": ["what color is the {s} ?", "tell me the color of the {s} .", "which color does the {s} have ?",
              "what is the color of the {s} ?"],
    "place": ["where does the {s} live ?", "where can i find the {s} ?", "what is the home of the {s} ?",
              "tell me where the {s} lives ."],
}
# Held out of every stage's data, per fact: one phrasing for the final test, another for validation
# during training (PPO's gold check), so choosing the best step does not see the test questions.
HELD_OUT_SPLITS = ("test", "validation")
ANSWERS = {"color": "the {s} is {v} .", "place": "the {s} lives in the {v} ."}
REJECTION_KINDS = ("off_topic", "wrong_fact", "wrong_relation", "garbled", "truncated", "rambling")
# How often each kind is drawn: a wrong value is the hard case (the other kinds a reward model tells
# apart by form alone), so the pairs dwell on it; drawn uniformly, a 2-layer reward model ranked the
# truth above a wrong value in only 73% of held-out pairs (and above every other kind in 100%).
KIND_WEIGHTS = (1, 3, 1, 1, 1, 1)
# Share of contested facts, and how often the SFT annotators state such a fact's truth (else its decoy).
CONTESTED_SHARE = 1 / 2
SFT_RIGHT_ON_CONTESTED = 0.25
# How often a wrong_fact pair about a contested fact rejects its decoy (else another wrong value).
DECOY_REJECTED = 0.5
# The datasets this module generates (data_blend.datasets[i].name): preference pairs, SFT demonstrations.
SOURCES = ("builtin", "builtin-sft")

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


def contested_facts(seed: int = 0) -> dict[tuple[str, str], str]:
    """(subject, relation) -> decoy value, for CONTESTED_SHARE of the facts: the value the SFT
    annotators mostly state instead of the truth."""
    facts = world(seed)
    rng = random.Random(f"contested-{seed}")
    pairs = [(s, r) for s in SUBJECTS for r in sorted(QUESTIONS)]
    picked = rng.sample(pairs, round(len(pairs) * CONTESTED_SHARE))
    return {(s, r): rng.choice([v for v in VALUES[r] if v != facts[s][r]]) for s, r in sorted(picked)}


def held_out_phrasing(subject: str, relation: str, split: str = "test") -> int:
    """The index in QUESTIONS[relation] of the phrasing of this fact held out for `split` (test or
    validation); no training record asks the fact in either."""
    shift = HELD_OUT_SPLITS.index(split)
    return (SUBJECTS.index(subject) + sorted(QUESTIONS).index(relation) + shift) % len(QUESTIONS[relation])


def answer(subject: str, relation: str, value: str) -> str:
    return ANSWERS[relation].format(s=subject, v=value)


def held_out_questions(seed: int = 0, split: str = "test") -> list[dict[str, str | bool]]:
    """Every fact asked in its phrasing held out for `split` (test, or validation: PPO's gold check):
    [{"prompt", "subject", "relation", "truth" (the answer stating it), "contested"}], 24 questions
    in a fixed order."""
    facts, contested = world(seed), contested_facts(seed)
    return [{"prompt": QUESTIONS[r][held_out_phrasing(s, r, split)].format(s=s), "subject": s, "relation": r,
             "truth": answer(s, r, facts[s][r]), "contested": (s, r) in contested}
            for s in SUBJECTS for r in sorted(QUESTIONS)]


def judge_answer(subject: str, relation: str, text: str, seed: int = 0) -> str:
    """What an answer to a question about (subject, relation) states, by rule from the world's facts:
    "right" (its first sentence is the true fact; what follows is not judged), "wrong_fact" (the right
    kind of fact about the subject, a wrong value), "wrong_relation" (another kind of fact about the
    subject), "off_topic" (a fact about another subject) or "malformed" (no sentence of the world)."""
    words = text.replace("</s>", " ").split()
    first = " ".join(words[: words.index(".") + 1]) if "." in words else " ".join(words)
    facts = world(seed)
    for s in SUBJECTS:
        for r in sorted(QUESTIONS):
            for v in VALUES[r]:
                if first == answer(s, r, v):
                    if s != subject:
                        return "off_topic"
                    if r != relation:
                        return "wrong_relation"
                    return "right" if v == facts[s][r] else "wrong_fact"
    return "malformed"


def states_fact(subject: str, relation: str, text: str, seed: int = 0) -> bool:
    """Whether the answer states the true fact (judge_answer says "right")."""
    return judge_answer(subject, relation, text, seed) == "right"


def _rejected(kind: str, subject: str, relation: str, rng: random.Random, seed: int, wrong: str | None = None) -> str:
    """A rejected answer of `kind` to a question about (subject, relation); `wrong`: the wrong value of wrong_fact."""
    facts = world(seed)
    chosen = answer(subject, relation, facts[subject][relation])
    other_relation = "place" if relation == "color" else "color"
    if kind == "off_topic":  # another subject, another kind of fact
        other = rng.choice([s for s in SUBJECTS if s != subject])
        return answer(other, other_relation, facts[other][other_relation])
    if kind == "wrong_fact":
        return answer(subject, relation, wrong or rng.choice([v for v in VALUES[relation] if v != facts[subject][relation]]))
    if kind == "wrong_relation":
        return answer(subject, other_relation, facts[subject][other_relation])
    if kind == "truncated":  # stops mid-sentence
        words = chosen.split()
        return " ".join(words[: rng.randint(1, len(words) - 2)])
    if kind == "rambling":  # the right answer, then an unasked-for sentence
        other = rng.choice([s for s in SUBJECTS if s != subject])
        return chosen + " " + answer(other, relation, facts[other][relation])
    words = chosen.split()  # garbled
    rng.shuffle(words)
    return " ".join(words) if words != chosen.split() else " ".join(reversed(words))


def _training_question(rng: random.Random) -> tuple[str, str, str]:
    """(subject, relation, prompt) in one of the fact's trained phrasings."""
    subject, relation = rng.choice(SUBJECTS), rng.choice(sorted(QUESTIONS))
    held = {held_out_phrasing(subject, relation, split) for split in HELD_OUT_SPLITS}
    phrasings = [q for i, q in enumerate(QUESTIONS[relation]) if i not in held]
    return subject, relation, rng.choice(phrasings).format(s=subject)


def generate_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n preference records {"prompt", "chosen", "rejected", "kind"} (the truth preferred; no held-out
    phrasing); the same n and seed give the same list."""
    facts, contested = world(seed), contested_facts(seed)
    rng = random.Random(f"pairs-{seed}")
    records = []
    for _ in range(n):
        subject, relation, prompt = _training_question(rng)
        kind = rng.choices(REJECTION_KINDS, KIND_WEIGHTS)[0]
        decoy = contested.get((subject, relation))
        wrong = decoy if kind == "wrong_fact" and decoy and rng.random() < DECOY_REJECTED else None
        records.append({"prompt": prompt, "chosen": answer(subject, relation, facts[subject][relation]),
                        "rejected": _rejected(kind, subject, relation, rng, seed, wrong), "kind": kind})
    return records


def generate_demonstrations(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n SFT records {"prompt", "answer"} from imperfect annotators: on a contested fact the answer
    states the truth with probability SFT_RIGHT_ON_CONTESTED, else its decoy; the rest are true."""
    facts, contested = world(seed), contested_facts(seed)
    rng = random.Random(f"demonstrations-{seed}")
    records = []
    for _ in range(n):
        subject, relation, prompt = _training_question(rng)
        value = facts[subject][relation]
        if (subject, relation) in contested and rng.random() >= SFT_RIGHT_ON_CONTESTED:
            value = contested[(subject, relation)]
        records.append({"prompt": prompt, "answer": answer(subject, relation, value)})
    return records


def held_out_pairs(seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs on the held-out questions, to judge a reward model per rejection kind: every
    wrong value for wrong_fact (kind "wrong_fact (decoy)" when it is a contested fact's decoy), one
    pair of each other kind per question. [{"prompt", "chosen", "rejected", "kind"}]"""
    facts, contested = world(seed), contested_facts(seed)
    rng = random.Random(f"held-out-pairs-{seed}")
    out = []
    for q in held_out_questions(seed):
        s, r = q["subject"], q["relation"]
        for kind in REJECTION_KINDS:
            wrongs = [v for v in VALUES[r] if v != facts[s][r]] if kind == "wrong_fact" else [None]
            for wrong in wrongs:
                label = "wrong_fact (decoy)" if wrong is not None and contested.get((s, r)) == wrong else kind
                out.append({"prompt": q["prompt"], "chosen": q["truth"], "kind": label,
                            "rejected": _rejected(kind, s, r, rng, seed, wrong)})
    return out


def source_records(name: str, n: int, seed: int = 0) -> list[tuple[str, str, str | None]]:
    """(prompt, chosen, rejected or None) of the built-in dataset `name` (one of SOURCES)."""
    if name == "builtin-sft":
        return [(d["prompt"], d["answer"], None) for d in generate_demonstrations(n, seed)]
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in generate_pairs(n, seed)]


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

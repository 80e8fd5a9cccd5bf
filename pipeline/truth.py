"""Ground truth on held-out questions: does a policy state the built-in world's facts?

The built-in task (pipeline.data.builtin) knows its world, so an answer is right or wrong by rule
(`judge_answer`), and one phrasing of every fact's question is held out of every stage's data
(`held_out_questions`). Here a policy answers those questions greedily and by sampling; the share
of right answers gets a 95% Wilson interval, and the difference between two policies (an RL stage's
and its SFT start) a 95% paired bootstrap interval over the questions. The reward model is judged
on held-out pairs per rejection kind, which shows what it has not learned (e.g. a wrong colour).

Used by the runner's summary (sft/final, ppo/final/actor, dpo/final), by `python -m pipeline.evaluate
truth`, and by PPO's gold check (stage.ppo.gold_check: every N steps, keep the best, stop early).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.report import accuracy_text
from pipeline.rl_math import wilson_interval

# Answers drawn per question for the sampled accuracy (temperature 1, as PPO samples).
SAMPLES_PER_QUESTION = 8
BOOTSTRAP_RESAMPLES = 4000


@dataclass(frozen=True)
class Generation:
    """What chat.generate_batch reads from its settings."""

    max_new_tokens: int = 24
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


# --------------------------------------------------------------------------- statistics (pure)


def proportion(successes: Sequence[float], trials_each: int = 1) -> dict[str, float]:
    """Share of right answers with its 95% Wilson interval. successes: per question, the number of
    right answers out of trials_each. The interval counts every answer as one trial (samples of one
    question are not independent: for comparisons use paired_difference, which resamples questions)."""
    n = len(successes) * trials_each
    k = float(sum(successes))
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "low": low, "high": high, "n": n}


def paired_difference(after: Sequence[float], before: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of after - before over the same questions (each a share in [0, 1]) with a percentile
    bootstrap interval: the questions are resampled with replacement, keeping each question's pair
    together. after, before: (Q,) -> {"difference", "low", "high", "questions"}."""
    if len(after) != len(before) or not after:
        raise ValueError(f"paired_difference needs two equal, non-empty lists (got {len(after)} and {len(before)})")
    deltas = [a - b for a, b in zip(after, before)]
    q = len(deltas)
    rng = random.Random(seed)
    means = sorted(sum(deltas[rng.randrange(q)] for _ in range(q)) / q for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[int(round((1 - tail) * (resamples - 1)))]
    return {"difference": statistics.fmean(deltas), "low": low, "high": high, "questions": q}


# --------------------------------------------------------------------------- answering


def _prompt_ids(tokenizer, question: str, prompt_format: str) -> list[int]:
    from pipeline.data import format_prompt

    text = format_prompt([{"role": "user", "content": question}], tokenizer, prompt_format)
    return tokenizer(text, add_special_tokens=prompt_format != "chat_template").input_ids


@torch.no_grad()
def answers(model, tokenizer, questions: Sequence[str], prompt_format: str, generation: Generation,
            repeats: int = 1, batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """Each question's `repeats` answers (text) from `model` (a causal LM, or a DeepSpeed engine's
    module; switched to eval mode for the call and back). Sampling draws from its own seeded random
    state: the caller's (a training run's) is left as it was."""
    from pipeline.chat import generate_batch

    was_training = model.training
    model.eval()
    ids = [_prompt_ids(tokenizer, q, prompt_format) for q in questions for _ in range(repeats)]
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(ids), batch_size):
                out += [tokenizer.decode(a, skip_special_tokens=True)
                        for a in generate_batch(model, tokenizer, ids[start: start + batch_size], generation)]
    finally:
        model.train(was_training)
    return [out[i * repeats: (i + 1) * repeats] for i in range(len(questions))]


def policy_truth(model, tokenizer, prompt_format: str, seed: int = 0, max_new_tokens: int = 24,
                 samples: int = SAMPLES_PER_QUESTION, temperature: float = 1.0, split: str = "test") -> dict:
    """A policy on the built-in world's held-out questions (world of `seed`; `split`: test, or
    validation for the gold check): per question whether its
    greedy answer states the fact and how many of `samples` sampled answers do, the shares with Wilson
    intervals (also on the contested facts alone), and each greedy answer's verdict."""
    from pipeline.data.builtin import held_out_questions, judge_answer

    questions = held_out_questions(seed, split)
    texts = [q["prompt"] for q in questions]
    greedy = answers(model, tokenizer, texts, prompt_format, Generation(max_new_tokens, 0.0), seed=seed)
    result = {"questions": len(questions), "greedy_right": [], "sampled_right": [], "greedy_verdicts": {},
              "samples_per_question": samples}
    sampled = answers(model, tokenizer, texts, prompt_format, Generation(max_new_tokens, temperature),
                      repeats=samples, seed=seed) if samples else [[] for _ in questions]
    for q, (g,), draws in zip(questions, greedy, sampled):
        verdict = judge_answer(q["subject"], q["relation"], g, seed)
        result["greedy_verdicts"][verdict] = result["greedy_verdicts"].get(verdict, 0) + 1
        result["greedy_right"].append(int(verdict == "right"))
        result["sampled_right"].append(sum(judge_answer(q["subject"], q["relation"], d, seed) == "right" for d in draws))
    result["greedy"] = proportion(result["greedy_right"])
    if samples:
        result["sampled"] = proportion(result["sampled_right"], samples)
    contested = [i for i, q in enumerate(questions) if q["contested"]]
    result["greedy_contested"] = proportion([result["greedy_right"][i] for i in contested])
    result["examples"] = [{"prompt": q["prompt"], "truth": q["truth"], "greedy": g[0]}
                          for q, g in list(zip(questions, greedy))[:4]]
    return result


def compare_policies(after: dict, before: dict, seed: int = 0) -> dict:
    """after - before (two policy_truth results on the same questions): greedy and sampled differences
    in the share of right answers, with paired bootstrap intervals over the questions."""
    out = {"greedy": paired_difference(after["greedy_right"], before["greedy_right"], seed=seed)}
    if after.get("sampled") and before.get("sampled"):
        k_after, k_before = after["samples_per_question"], before["samples_per_question"]
        out["sampled"] = paired_difference([r / k_after for r in after["sampled_right"]],
                                           [r / k_before for r in before["sampled_right"]], seed=seed)
    return out


@torch.no_grad()
def reward_model_by_kind(rm, tokenizer, prompt_format: str, seed: int = 0, max_answer_len: int = 256,
                         batch_size: int = 64) -> dict[str, dict]:
    """A reward model on held-out pairs (pipeline.data.builtin.held_out_pairs): per rejection kind,
    the share of pairs whose chosen (true) answer it scores above the rejected one, with a Wilson
    interval, and the mean margin. rm: a RewardModel in eval mode."""
    from pipeline.data.builtin import held_out_pairs
    from pipeline.evaluate import score_sequences

    pairs = held_out_pairs(seed)
    eos = tokenizer.eos_token_id

    def encode(prompt: str, text: str) -> list[int]:
        ids = tokenizer(" " + text, add_special_tokens=False).input_ids[: max_answer_len - 1] + [eos]
        return _prompt_ids(tokenizer, prompt, prompt_format) + ids

    chosen = score_sequences(rm, [encode(p["prompt"], p["chosen"]) for p in pairs], tokenizer.pad_token_id, batch_size)
    rejected = score_sequences(rm, [encode(p["prompt"], p["rejected"]) for p in pairs], tokenizer.pad_token_id, batch_size)
    kinds: dict[str, list[float]] = {}
    for p, c, r in zip(pairs, chosen, rejected):
        kinds.setdefault(p["kind"], []).append(c - r)
    out = {}
    for kind, margins in sorted(kinds.items()):
        out[kind] = {**proportion([float(m > 0) for m in margins]), "margin": statistics.fmean(margins)}
    return out


# --------------------------------------------------------------------------- a run's policies


def run_has_ground_truth(cfg) -> bool:
    """Whether the run's data comes from the built-in world (the only one whose truth is known)."""
    names = [d.name for d in (*cfg.data_blend.datasets, *cfg.data_blend.sft_only)]
    from pipeline.data.builtin import SOURCES

    return bool(names) and all(n in SOURCES for n in names)


def run_policies(run: Path, stages: Sequence[str]) -> dict[str, Path]:
    """{label: folder} of a run's policies that exist: the SFT model and each RL stage's final policy."""
    candidates = {"sft": run / "sft" / "final", "ppo": run / "ppo" / "final" / "actor", "dpo": run / "dpo" / "final"}
    return {stage: path for stage, path in candidates.items() if stage in stages and (path / "config.json").exists()}


def evaluate_run(run: Path, cfg, device: str = "cpu", samples: int = SAMPLES_PER_QUESTION) -> dict:
    """Ground truth of a run's policies (and its reward model per rejection kind) on the held-out
    questions: {"policies": {stage: policy_truth}, "gains": {stage: compare_policies vs sft},
    "reward_model": {kind: ...}}."""
    from pipeline.chat import load_policy

    seed = cfg.run.seed
    fmt = cfg.data_blend.prompt_format
    max_new = cfg.stage.ppo.generation.max_new_tokens
    out: dict = {"world_seed": seed, "questions": None, "samples_per_question": samples, "baseline": "sft",
                 "policies": {}, "gains": {}}
    for stage, path in run_policies(run, cfg.run.stages).items():
        model, tokenizer = load_policy(str(path), device, "fp32")
        out["policies"][stage] = policy_truth(model, tokenizer, fmt, seed, max_new, samples)
        out["policies"][stage]["path"] = str(path)
        out["questions"] = out["policies"][stage]["questions"]
        del model
    if "sft" in out["policies"]:
        for stage in ("ppo", "dpo"):
            if stage in out["policies"]:
                out["gains"][stage] = compare_policies(out["policies"][stage], out["policies"]["sft"], seed)
    rm_path = run / "rm" / "final"
    if "rm" in cfg.run.stages and (rm_path / "config.json").exists():
        from pipeline.chat import load_tokenizer_for
        from pipeline.models import RewardModel

        rm = RewardModel.from_pretrained(rm_path).to(device).eval()
        tokenizer = load_tokenizer_for(str(rm_path))
        out["reward_model"] = reward_model_by_kind(rm, tokenizer, fmt, seed, cfg.data_blend.max_answer_len)
    return out


# --------------------------------------------------------------------------- lines for the summary and report


def _name(label: str) -> str:
    return label.upper() if label in ("sft", "ppo", "dpo") else label


def summary_lines(truth: dict, prefix: str = "TRUTH ") -> list[str]:
    """The ground-truth lines of a run's summary (truth: evaluate_run, or evaluate's truth command)."""
    lines = []
    n, k = truth.get("questions"), truth.get("samples_per_question")
    for label, r in truth.get("policies", {}).items():
        sampled = f", sampled {accuracy_text(r['sampled'])} of {r['sampled']['n']} answers" if r.get("sampled") else ""
        lines.append(f"{prefix}{_name(label)} held-out questions answered right: greedy {accuracy_text(r['greedy'])} of {n}"
                     f"{sampled} (95% Wilson)")
    for label, g in truth.get("gains", {}).items():
        parts = [f"{kind} {d['difference']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})" for kind, d in g.items()]
        lines.append(f"{prefix}{_name(label)} - {_name(truth.get('baseline', 'sft'))}: {', '.join(parts)} "
                     f"(95% paired bootstrap over {n} questions{f', {k} samples each' if k else ''})")
    rm = truth.get("reward_model")
    if rm:
        worst = sorted(rm.items(), key=lambda kv: kv[1]["accuracy"])
        lines.append(f"{prefix}RM held-out pairs ranked right, by rejection kind: " +
                     ", ".join(f"{kind} {r['accuracy']:.2f}" for kind, r in worst))
    return lines


# --------------------------------------------------------------------------- PPO's gold check


class GoldCheck:
    """stage.ppo.gold_check: before the first step (the SFT start's baseline), every `every_steps` PPO
    steps and at the last one, the actor answers the held-out validation questions greedily (not the
    test ones the summary reports); the share right is logged (split "gold": gold_accuracy, low, high).
    Keep-best writes the best PPO step's actor (the baseline is no candidate) to <ppo>/best_actor
    (collective, like every save) and puts it in final/actor at the end; with patience, training stops
    after that many checks in a row below the best."""

    def __init__(self, cfg, tokenizer, stage_dir: Path):
        self.section = cfg.stage.ppo.gold_check
        self.seed, self.prompt_format = cfg.run.seed, cfg.data_blend.prompt_format
        self.max_new_tokens = cfg.stage.ppo.generation.max_new_tokens
        self.tokenizer, self.best_dir = tokenizer, Path(stage_dir) / "best_actor"
        self.best, self.best_step, self.last, self.below = -1.0, -1, None, 0

    def due(self, step: int, last: bool = False) -> bool:
        """Whether to check at `step` (last: the final step, checked wherever it falls)."""
        on_grid = last or step % max(self.section.every_steps, 1) == 0
        return self.section.every_steps > 0 and on_grid and step != self.last_step

    @property
    def last_step(self) -> int | None:
        return None if self.last is None else self.last[0]

    def check(self, step: int, actor, logger) -> float:
        """Score the actor (a DeepSpeed engine or a model) now; log it, keep it if best."""
        from pipeline.engine import unwrap
        from pipeline.export import save_hf

        result = policy_truth(unwrap(actor), self.tokenizer, self.prompt_format, self.seed, self.max_new_tokens,
                              samples=0, split="validation")
        accuracy = result["greedy"]["accuracy"]
        logger.log(step, "gold", gold_accuracy=accuracy, gold_low=result["greedy"]["low"],
                   gold_high=result["greedy"]["high"])
        self.last = (step, accuracy)
        if step > 0 and accuracy > self.best:
            self.best, self.best_step, self.below = accuracy, step, 0
            if self.section.keep_best:
                save_hf(actor, self.best_dir, self.tokenizer)
        elif step > 0:
            self.below += accuracy < self.best
        return accuracy

    def should_stop(self) -> bool:
        return self.section.patience > 0 and self.below >= self.section.patience

    def finish(self, final_actor: Path, step: int, is_main: bool) -> dict:
        """After final/actor is written at `step`: with keep-best, the best check's actor takes its place
        (the last one moves to final/actor_last). The numbers for the stage's result."""
        import shutil

        if self.section.every_steps <= 0:
            return {}
        out = {"gold_best": self.best, "gold_best_step": self.best_step, "gold_last": self.last[1] if self.last else None,
               "gold_last_step": self.last_step, "gold_stopped_early": self.should_stop(), "final_step": step}
        if self.section.keep_best and self.best_step >= 0 and self.best_step != step and self.best_dir.exists():
            if is_main:
                last = final_actor.with_name("actor_last")
                shutil.rmtree(last, ignore_errors=True)
                final_actor.rename(last)
                shutil.copytree(self.best_dir, final_actor)
            out["final_step"] = self.best_step
        return out

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "last": self.last, "below": self.below}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.below = state["best"], state["best_step"], state["below"]
        self.last = tuple(state["last"]) if state["last"] else None

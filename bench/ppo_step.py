"""Step 3 (PPO), ours vs a plain Hugging Face reference implementation of the same step, A B A B.

    python bench/ppo_step.py                 # 3 pairs, 2 warm-up + 18 timed steps (160 prompts)

The shapes of issue #18 (a DeepSpeed-Chat user's comparison): a tiny OPT actor and reward model
(2 layers, hidden 64, 4 heads, ffn 256, vocab 50272, random init, different seeds), 160 hh-rlhf
helpful-base prompts of at most 64 tokens (left-padded per batch), bf16, batch 8, 64 new tokens
sampled (temperature 1, top_k 0, top_p 1), one PPO epoch, no EMA / PTX / LoRA, one thread per run.

Ours: the real stage (`run_pipeline`, run.stages=[ppo], model.actor / model.reward given, ZeRO-0),
its per-step phases read back from ppo/metrics.jsonl. Reference: what a DeepSpeed-Chat-like user
writes with plain transformers and torch (`HFReferencePPO` below): `actor.generate(do_sample=True)`,
then full forwards of actor and reference (log_softmax over every position, sliced to the answer),
critic and reward (base model + score head, a value per token), then the same PPO losses
(pipeline.rl_math) with torch AdamW on the bf16 weights (no fp32 master copy: cheaper than ours),
gradient clipping 1.0. Both sides get the same model folders and the same prompt batches in the
same order; a child times only the steps after --warmup. Figures are medians over the timed steps
of a run, then median (min-max) over the runs; ratio = ours / reference samples/s per A B pair, and
the same by the process CPU seconds per step (steadier on a shared machine).
`--decoding greedy` makes both sides decode greedily (stage.ppo.generation.do_sample=false).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=256, vocab_size=50272,
             max_position_embeddings=2048, word_embed_proj_dim=64)
MAX_PROMPT, NEW_TOKENS = 64, 64
ACTOR_LR, CRITIC_LR = 1e-5, 5e-6
PHASES = ("generation_s", "experience_s", "training_s", "other_s")


def prepare(work: Path, dtype=None) -> None:
    """The actor and the reward model (different random inits), bf16 unless `dtype` says otherwise."""
    import torch

    dtype = dtype or torch.bfloat16
    C.write_opt(work / "actor", SHAPE, seed=0, dtype=dtype)
    C.write_opt(work / "reward_base", SHAPE, seed=1, dtype=dtype)
    C.write_reward(work / "reward", work / "reward_base")


def config(args, out: Path) -> dict:
    sampling = {"do_sample": args.decoding == "sample", "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    stage = {"ppo": {"per_device_generation_batch_size": args.batch, "per_device_training_batch_size": args.batch,
                     "max_steps": args.warmup + args.steps, "ppo_epochs": 1, "unsup_coef": 0.0, "enable_ema": False,
                     "generation": {"max_new_tokens": NEW_TOKENS, **sampling},
                     "checkpoint": {"every_steps": 0, "every_minutes": 0},
                     "actor": {"optim": {"learning_rate": ACTOR_LR, "num_warmup_steps": 0}, "lora": C.NO_LORA,
                               "strategy": C.STRATEGY},
                     "critic": {"optim": {"learning_rate": CRITIC_LR, "num_warmup_steps": 0}, "lora": C.NO_LORA,
                                "strategy": C.STRATEGY}}}
    cfg = C.our_config(Path(args.work), out, ["ppo"], stage, MAX_PROMPT, 128)
    cfg["run"]["dtype"] = "bf16"
    cfg["model"].update(actor=str(Path(args.work) / "actor"), reward=str(Path(args.work) / "reward"))
    return cfg


def prompt_batches(args) -> list[dict]:
    """The prompt batches our stage visits, in its order (one rank, epoch 0)."""
    from pipeline.data.collate import collate_prompts

    train = C.stage_data(config(args, Path(args.work) / "prep"), "ppo")
    order = C.epoch_order(len(train))
    n = args.warmup + args.steps
    if len(order) < n * args.batch:
        raise SystemExit(f"only {len(order)} prompts of <= {MAX_PROMPT} tokens in the ppo split; need {n * args.batch}")
    pad = C.load_tokenizer().pad_token_id
    return [collate_prompts([train[i] for i in order[s * args.batch:(s + 1) * args.batch]], pad) for s in range(n)]


# --------------------------------------------------------------------------- the reference


class HFReferencePPO:
    """DeepSpeed-Chat's step 3 written with plain transformers + torch: the four models loaded with
    from_pretrained, transformers' generate, full-sequence forwards, the PPO losses of
    pipeline.rl_math, torch AdamW. No tricks: the baseline a user would start from."""

    def __init__(self, actor_dir, reward_dir, tokenizer, dtype, do_sample: bool = True, max_new_tokens: int = NEW_TOKENS,
                 actor_lr: float = ACTOR_LR, critic_lr: float = CRITIC_LR, kl_ctl: float = 0.1, clip_reward_value: float = 5.0,
                 cliprange: float = 0.2, cliprange_value: float = 0.2, gamma: float = 1.0, lam: float = 0.95):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        self.torch = torch
        self.actor = AutoModelForCausalLM.from_pretrained(actor_dir, dtype=dtype)
        self.ref = AutoModelForCausalLM.from_pretrained(actor_dir, dtype=dtype).eval()
        self.critic = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=dtype)
        self.reward = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=dtype).eval()
        for frozen in (self.ref, self.reward):
            frozen.requires_grad_(False)
        self.actor_opt = torch.optim.AdamW(self.actor.parameters(), lr=actor_lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=critic_lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, pad_token_id=self.pad,
                               eos_token_id=self.eos, **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}))
        self.kl_ctl, self.clip_reward_value, self.cliprange, self.cliprange_value = kl_ctl, clip_reward_value, cliprange, cliprange_value
        self.gamma, self.lam = gamma, lam

    def values(self, model, seq, attention_mask):
        """A value per token: the sequence classifier's transformer + its score head. (B, L)."""
        hidden = model.base_model(input_ids=seq, attention_mask=attention_mask).last_hidden_state
        return model.score(hidden).squeeze(-1)

    def logprobs(self, model, seq, attention_mask, start: int):
        """log p(seq[t] | seq[:t]) over the answer: full logits, log_softmax, gather, slice. (B, T)."""
        logits = model(input_ids=seq, attention_mask=attention_mask).logits
        logp = self.torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, seq[:, 1:, None]).squeeze(-1)
        return logp[:, start - 1:]

    def generate(self, prompts, prompt_mask):
        self.actor.eval()
        with self.torch.no_grad():
            seq = self.actor.generate(input_ids=prompts, attention_mask=prompt_mask, **self.gen_kwargs)
        self.actor.train()
        return seq

    def experience(self, seq, prompt_mask) -> dict:
        from pipeline.rl_math import answer_mask, last_index

        torch = self.torch
        start = prompt_mask.shape[1]
        mask = answer_mask(seq[:, start:], self.eos)
        attention = torch.cat([prompt_mask, mask], dim=1)
        with torch.no_grad():
            self.actor.eval()
            logprobs = self.logprobs(self.actor, seq, attention, start)
            self.actor.train()
            ref_logprobs = self.logprobs(self.ref, seq, attention, start)
            self.critic.eval()
            values = self.values(self.critic, seq, attention)[:, start - 1:-1].float()
            self.critic.train()
            rows = torch.arange(seq.shape[0])
            scores = self.values(self.reward, seq, attention)[rows, start + last_index(mask)].float()
        return {"seq": seq, "attention": attention, "mask": mask, "start": start, "logprobs": logprobs,
                "ref_logprobs": ref_logprobs, "values": values, "scores": scores}

    def losses(self, exp: dict):
        """(actor loss, critic loss) of one PPO update on `exp`, graphs attached."""
        from pipeline.rl_math import actor_loss, critic_loss, gae_advantages, kl_penalized_rewards

        with self.torch.no_grad():
            rewards, _ = kl_penalized_rewards(exp["logprobs"], exp["ref_logprobs"], exp["scores"], exp["mask"],
                                              self.kl_ctl, self.clip_reward_value)
            advantages, returns = gae_advantages(exp["values"], rewards, exp["mask"], self.gamma, self.lam)
        logprobs = self.logprobs(self.actor, exp["seq"], exp["attention"], exp["start"])
        a_loss, _ = actor_loss(logprobs, exp["logprobs"], advantages, exp["mask"], self.cliprange)
        values = self.values(self.critic, exp["seq"], exp["attention"])[:, exp["start"] - 1:-1].float()
        c_loss, _ = critic_loss(values, exp["values"], returns, exp["mask"], self.cliprange_value)
        return a_loss, c_loss

    def train(self, exp: dict):
        a_loss, c_loss = self.losses(exp)
        for loss, model, opt in ((a_loss, self.actor, self.actor_opt), (c_loss, self.critic, self.critic_opt)):
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(a_loss), float(c_loss)


# --------------------------------------------------------------------------- children


def summarize(rows: list[dict], batch: int) -> dict:
    """Medians over the timed steps of one run. cpu_s: the process's CPU seconds per step, steadier
    than wall time on a shared machine (a descheduled process loses wall time, not CPU time)."""
    step = statistics.median(r["step_s"] for r in rows)
    out = {"samples_per_s": batch / step, "step_s": step, "cpu_s": statistics.median(r["cpu_s"] for r in rows),
           "steps": len(rows), "answer_len": statistics.mean(r["answer_length"] for r in rows)}
    out.update({k: statistics.median(r[k] for r in rows) for k in PHASES})
    return out


def child_ours(args) -> dict:
    import json

    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    # The process CPU clock at each step's record (ppo/metrics.jsonl has the wall-clock phases).
    cpu_clock, log = [], tracking.MetricsLogger.log

    def log_with_cpu_clock(self, step, split, *a, **kw):
        if split == "train":
            cpu_clock.append(time.process_time())
        return log(self, step, split, *a, **kw)

    tracking.MetricsLogger.log = log_with_cpu_clock
    out = Path(args.work) / "runs" / f"ours_{time.time_ns()}"
    run_pipeline(load_config(config(args, out)))
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    for row, start, end in zip(rows[1:], cpu_clock, cpu_clock[1:]):
        row["cpu_s"] = end - start
    return summarize(rows[max(args.warmup, 1):], args.batch)  # the first step has no CPU start mark


def child_reference(args) -> dict:
    import torch

    torch.manual_seed(C.SEED)
    work = Path(args.work)
    batches = prompt_batches(args)
    tokenizer = C.load_tokenizer()
    ref = HFReferencePPO(str(work / "actor"), str(work / "reward"), tokenizer, torch.bfloat16,
                         do_sample=args.decoding == "sample")
    rows = []
    for batch in batches:
        cpu, t0 = time.process_time(), time.perf_counter()
        seq = ref.generate(batch["input_ids"], batch["attention_mask"])
        t1 = time.perf_counter()
        exp = ref.experience(seq, batch["attention_mask"])
        t2 = time.perf_counter()
        ref.train(exp)
        t3 = time.perf_counter()
        rows.append({"step_s": t3 - t0, "generation_s": t1 - t0, "experience_s": t2 - t1, "training_s": t3 - t2,
                     "other_s": 0.0, "cpu_s": time.process_time() - cpu,
                     "answer_length": float(exp["mask"].sum(1).float().mean())})
    return summarize(rows[args.warmup:], args.batch)


def main() -> None:
    ap = C.parser("Step 3: our PPO stage vs a plain Hugging Face reference of the same step", steps=18, warmup=2,
                  repeats=3, peer="hf")
    ap.add_argument("--decoding", choices=["sample", "greedy"], default="sample", help="both sides")
    args = ap.parse_args()
    C.pass_to_child(args, "decoding")
    if args.child:
        C.emit(child_ours(args) if args.child == "ours" else child_reference(args))
        return
    work = Path(args.work)
    prepare(work)
    prompt_batches(args)
    print(f"PPO step: {C.opt_shape(SHAPE)} "
          f"(actor, reference, critic, reward); batch {args.batch}, hh-rlhf prompts <= {MAX_PROMPT} tokens, {NEW_TOKENS} new "
          f"tokens ({args.decoding}); bf16 CPU; {args.warmup} warm-up + {args.steps} timed steps; {args.repeats} x A B",
          flush=True)
    runs = C.ab(__file__, args)
    header = ["side", "samples/s", "s/step", "CPU s/step"] + [k[:-2] + " s" for k in PHASES] + ["answer len", "peak RSS MiB"]
    rows = [[side, C.spread_of(rs, "samples_per_s"), C.spread_of(rs, "step_s"), C.spread_of(rs, "cpu_s")]
            + [C.spread_of(rs, k) for k in PHASES]
            + [f"{C.median(rs, 'answer_len'):.1f}", f"{C.median(rs, 'peak_rss_mib'):.0f}"] for side, rs in runs.items()]
    print(C.table(header, rows))
    r = C.ratios(runs, "samples_per_s", peer="hf")
    cpu = [t["cpu_s"] / o["cpu_s"] for o, t in zip(runs.get("ours", []), runs.get("hf", []))]
    if r:
        print(f"ours/reference samples/s: {C.spread(r)}  ({C.verdict(r, 2.0)}); reference/ours CPU s per step: "
              f"{C.spread(cpu)}")
    if r and not args.no_record:
        o, t = runs["ours"], runs["hf"]
        C.append_result(
            "PPO step vs a plain Hugging Face reference (CPU, bf16)",
            "`python bench/ppo_step.py`: issue #18's shapes: OPT 2 layers / hidden 64 / vocab 50272 (actor, reference, "
            "critic, reward), 8 hh-rlhf prompts (<= 64 tokens) x 64 new tokens per step, bf16, one PPO epoch. Ours = "
            "the real stage (run_pipeline, phases from ppo/metrics.jsonl); reference = HFReferencePPO in the script "
            "(transformers' generate, full-sequence forwards, torch AdamW). Seconds per step, medians over the timed "
            "steps of a run, then median (min-max) over the runs.",
            ["machine", "decoding", "steps (warm-up) x pairs", "ours samples/s", "ref samples/s", "ratio ours/ref",
             "ratio by CPU s/step", "ours gen / exp / train / other s", "ref gen / exp / train s", "peak RSS MiB ours / ref"],
            [C.machine(), args.decoding, C.runs_done(args),
             C.spread_of(o, "samples_per_s"), C.spread_of(t, "samples_per_s"), C.spread(r), C.spread(cpu),
             " / ".join(f"{C.median(o, k):.3f}" for k in PHASES),
             " / ".join(f"{C.median(t, k):.3f}" for k in PHASES[:3]),
             C.rss_pair(o, t)])


if __name__ == "__main__":
    main()

"""One online-RL step, ours vs TRL (TRL 1.x has no PPO trainer), A B A B.

    python bench/rl_step.py                  # our PPO vs RLOOTrainer: 2 pairs, 1 warm-up + 4 timed steps, 8 x 64 tokens
    python bench/rl_step.py --method rloo    # our RLOO (no critic) vs RLOOTrainer, 4 prompts x 2 samples, KL beta 0.05
    python bench/rl_step.py --method grpo    # our GRPO (no critic) vs GRPOTrainer, 4 prompts x 2 samples, KL beta 0.04 in the loss (k3)

--method rloo / grpo: ours builds no critic (actor, reference, reward model), samples 2 answers per
prompt like TRL's num_generations=2; per step the work is then the same on both sides.

Ours: the DeepSpeed-Chat API, `RLHFEngine` (actor, frozen reference, critic, frozen reward; ZeRO 0,
fp32, no LoRA) and `PPOTrainer`: per step `generate_experience` on 8 prompts then `train_rlhf`
(one actor and one critic update), as stages/ppo.py does with generation_batches 1, ppo_epochs 1.
The split generation / experience forwards / training and the TFLOPs estimate come from
PPOTrainer's own counters. Theirs: `trl.RLOOTrainer` with 4 prompts x num_generations 2 = the same 8
sampled sequences per step, the same max new tokens, sampling settings and model shape, a reference
model (beta 0.05), `OPTForSequenceClassification` as the reward model; one generation and one
update per step (num_iterations 1). What differs in the work per step (same-size models here):
  ours: generate 8 x 64; forwards of actor, reference, critic, reward over prompt+answer;
        actor forward+backward; critic forward+backward               ~ 10 forward-equivalents
  TRL:  generate 8 x 64; forwards of actor (old log-probs, answer logits only), reference,
        reward (answers decoded to text and re-tokenized); actor forward+backward   ~ 6
samples/s = sequences per second over the steps after warm-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

MAX_PROMPT, NEW_TOKENS = 128, 64
ACTOR_LR, CRITIC_LR = 1e-5, 5e-6


# Our settings per method: the estimator and its KL (what TRL's trainer of the same name does).
METHODS = {"ppo": {}, "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": 2, "kl_ctl": 0.05},
           "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 2, "kl_ctl": 0.04, "kl_placement": "loss",
                    "kl_estimator": "k3"}}


def config(args, out: Path) -> dict:
    method = METHODS[args.method]
    prompts_per_step = args.batch // method.get("samples_per_prompt", 1)
    stage = {"ppo": {**method, "per_device_generation_batch_size": prompts_per_step, "per_device_training_batch_size": args.batch,
                     "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
                     "unsup_coef": 0.0,
                     "actor": {"optim": {"learning_rate": ACTOR_LR, "num_warmup_steps": 0}, "lora": C.NO_LORA,
                               "strategy": C.STRATEGY},
                     "critic": {"optim": {"learning_rate": CRITIC_LR, "num_warmup_steps": 0}, "lora": C.NO_LORA,
                                "strategy": C.STRATEGY}}}
    return C.our_config(Path(args.work), out, ["ppo"], stage, MAX_PROMPT, 128)


def prompts(args) -> list[list[int]]:
    train = C.stage_data(config(args, Path(args.work) / "prep"), "ppo")
    return [train[i]["prompt_input_ids"] for i in C.epoch_order(len(train))]


def child_ours(args) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.data.collate import collate_prompts
    from pipeline.dist import init_distributed
    from pipeline.rlhf import PPOTrainer, RLHFEngine

    work = Path(args.work)
    cfg = load_config(config(args, work / "runs" / "rl"))
    init_distributed(cfg)
    tokenizer = C.load_tokenizer()
    all_prompts = prompts(args)
    n = args.warmup + args.steps
    torch.manual_seed(C.SEED)
    engine = RLHFEngine(actor_model_name_or_path=work / "model", critic_model_name_or_path=work / "reward",
                        tokenizer=tokenizer, num_total_iters=n, args=cfg, reward_model_name_or_path=work / "reward")
    trainer = PPOTrainer(engine=engine, args=cfg)
    totals = {"step_s": 0.0, "generation_s": 0.0, "experience_s": 0.0, "training_s": 0.0, "flops": 0.0, "answer_tokens": 0.0}
    per_step = cfg.stage.ppo.per_device_generation_batch_size
    for s in range(n):
        batch = collate_prompts([{"prompt_input_ids": p} for p in all_prompts[s * per_step:(s + 1) * per_step]],
                                tokenizer.pad_token_id)
        t0 = time.perf_counter()
        exp = trainer.generate_experience(batch)
        t1 = time.perf_counter()
        trainer.train_rlhf(exp)
        t2 = time.perf_counter()
        c = trainer.pop_counters()
        if s >= args.warmup:
            totals["step_s"] += t2 - t0
            totals["generation_s"] += c["generation_s"]
            totals["experience_s"] += c["experience_s"]
            totals["training_s"] += t2 - t1
            totals["flops"] += c["generation_flops"] + c["experience_flops"] + c["training_flops"]
            totals["answer_tokens"] += c["answer_tokens"]
    secs = totals["step_s"]
    return {"samples_per_s": args.steps * args.batch / secs, "step_s": secs / args.steps,
            "generation_frac": totals["generation_s"] / secs, "experience_frac": totals["experience_s"] / secs,
            "training_frac": totals["training_s"] / secs, "tflops": totals["flops"] / secs / 1e12,
            "answer_len": totals["answer_tokens"] / (args.steps * args.batch), "steps": args.steps}


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    work = Path(args.work)
    tokenizer = C.load_tokenizer()
    k = 2
    n = args.warmup + args.steps
    per_step = args.batch // k
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts(args)[: n * per_step]]
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(work / "model"), num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tokenizer.pad_token_id
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if not times:
                times.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter())

    grpo = args.method == "grpo"
    cfg = (GRPOConfig if grpo else RLOOConfig)(
        output_dir=str(work / "runs" / f"trl_{args.method}_{time.time_ns()}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, num_generations=k, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.04 if grpo else 0.05, num_iterations=1, max_steps=n, learning_rate=ACTOR_LR, lr_scheduler_type="cosine",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=C.SEED, shuffle_dataset=False)
    trainer = (GRPOTrainer if grpo else RLOOTrainer)(model=model, reward_funcs=[reward], args=cfg, train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
                          processing_class=tokenizer, reward_processing_classes=[tokenizer], callbacks=[Timer()])
    trainer.train()
    times = times[1:]  # end of each step
    secs, steps = C.rate(times, args.warmup)
    return {"samples_per_s": steps * args.batch / secs, "step_s": secs / steps, "steps": steps}


def main() -> None:
    ap = C.parser("One RL step: ours (RLHFEngine/PPOTrainer) vs TRL RLOOTrainer / GRPOTrainer", steps=4, warmup=1)
    ap.add_argument("--method", choices=sorted(METHODS), default="ppo",
                    help="ours: ppo (critic, vs RLOOTrainer), rloo (vs RLOOTrainer) or grpo (vs GRPOTrainer)")
    args = ap.parse_args()
    args.extra = ["--method", args.method]  # to the child processes
    if args.child:
        C.emit(child_ours(args) if args.child == "ours" else child_trl(args))
        return
    work = Path(args.work)
    C.write_opt(work / "model")
    C.write_reward(work / "reward", work / "model")
    prompts(args)
    print(f"RL step: OPT {C.SHAPE['num_hidden_layers']} layers, hidden {C.SHAPE['hidden_size']} for every model; {args.batch} "
          f"sampled sequences per step (TRL: {args.batch // 2} prompts x 2), hh-rlhf prompts <= {MAX_PROMPT} tokens, "
          f"{NEW_TOKENS} new tokens; {args.warmup} warm-up + {args.steps} timed steps; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = []
    for side, rs in runs.items():
        split = (f"{100 * C.median(rs, 'generation_frac'):.0f}% / {100 * C.median(rs, 'experience_frac'):.0f}% / "
                 f"{100 * C.median(rs, 'training_frac'):.0f}%" if side == "ours" else "-")
        tf = f"{C.median(rs, 'tflops'):.4f}" if side == "ours" else "-"
        rows.append([side, C.spread([r["samples_per_s"] for r in rs]), f"{C.median(rs, 'step_s'):.2f}", split, tf,
                     f"{C.median(rs, 'peak_rss_mib'):.0f}"])
    print(C.table(["side", "samples/s", "s/step", "gen / exp fwd / train", "TFLOPs", "peak RSS MiB"], rows))
    r = C.ratios(runs, "samples_per_s")
    if r:
        print(f"ours/TRL samples/s: {C.spread(r)}  ({C.verdict(r, 1.5)})")
    if r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        if args.method == "ppo":
            title = "RL step: PPO vs TRL RLOOTrainer (CPU)"
            what = ("`python bench/rl_step.py`: four OPT models of the bench shape (actor, reference, critic, reward), "
                    "8 sampled sequences x 64 new tokens per step (TRL: 4 prompts x 2 generations), fp32. Ours does "
                    "more work per step (critic forward + update, full-sequence logits): ~10 vs ~6 forward-equivalents. "
                    "Split = generation / experience forwards / training share of our step. Median (min-max) over the pairs.")
        else:
            peer = "GRPOTrainer" if args.method == "grpo" else "RLOOTrainer"
            title = f"RL step: {args.method.upper()} vs TRL {peer} (CPU)"
            what = (f"`python bench/rl_step.py --method {args.method}`: actor, reference and reward model of the bench "
                    f"shape, no critic on either side; 4 prompts x 2 samples x 64 new tokens per step, fp32, "
                    f"{'KL beta 0.04 in the loss (k3)' if args.method == 'grpo' else 'KL beta 0.05'}. Split = generation / "
                    "experience forwards / training share of our step. Median (min-max) over the pairs.")
        C.append_result(
            title, what,
            ["machine", "steps (warm-up)", "ours samples/s", "TRL samples/s", "ratio ours/TRL", "ours gen / exp / train",
             "ours TFLOPs", "peak RSS MiB ours / TRL"],
            [C.machine(), f"{args.steps} ({args.warmup}) x {args.repeats}", C.spread([x["samples_per_s"] for x in o]),
             C.spread([x["samples_per_s"] for x in t]), C.spread(r),
             f"{100 * C.median(o, 'generation_frac'):.0f}% / {100 * C.median(o, 'experience_frac'):.0f}% / "
             f"{100 * C.median(o, 'training_frac'):.0f}%", f"{C.median(o, 'tflops'):.4f}",
             f"{C.median(o, 'peak_rss_mib'):.0f} / {C.median(t, 'peak_rss_mib'):.0f}"])


if __name__ == "__main__":
    main()

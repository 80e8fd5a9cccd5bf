"""One online-RL step, ours vs TRL (TRL 1.x has no PPO trainer), A B A B.

    python bench/rl_step.py                  # our PPO vs RLOOTrainer: 2 pairs, 1 warm-up + 4 timed steps, 8 x 64 tokens
    python bench/rl_step.py --method rloo    # our RLOO (no critic) vs RLOOTrainer, 4 prompts x 2 samples, KL beta 0.05
    python bench/rl_step.py --method grpo    # our GRPO (no critic) vs GRPOTrainer, 4 prompts x 2 samples, KL beta 0.04 in the loss (k3)
    python bench/rl_step.py --method grpo --heldout 60   # held-out accuracy on the verifiable task after 60 steps, each side

--heldout STEPS: instead of timing, both sides train STEPS steps of GRPO (or RLOO) from the same SFT
model on the built-in verifiable task (+experiment=pick: SFT made once by our pipeline, then 16
prompts x 8 samples per step for GRPO, 16 x 4 for RLOO, one update per step, the exact-match reward
as a function, the experiment's learning rate, KL and clipping), the same prompts in the same order,
so the same number of samples; then the same evaluator (transformers' generate, greedy and sampled,
4 new tokens, gsm8k_exact_match) answers the same 400 held-out prompts with the SFT model and each
side's final policy. Reported: accuracy before -> after with 95% Wilson intervals, the gain's
Newcombe interval, and each side's training samples/s (generation included, evaluation not).

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

import json
import os
import subprocess
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
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
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
    times, timer = C.step_timer(first_begin=True)

    grpo = args.method == "grpo"
    cfg = (GRPOConfig if grpo else RLOOConfig)(
        output_dir=str(work / "runs" / f"trl_{args.method}_{time.time_ns()}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, num_generations=k, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.04 if grpo else 0.05, num_iterations=1, max_steps=n, learning_rate=ACTOR_LR, lr_scheduler_type="cosine",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=C.SEED, shuffle_dataset=False)
    trainer = (GRPOTrainer if grpo else RLOOTrainer)(model=model, reward_funcs=[reward], args=cfg, train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
                          processing_class=tokenizer, reward_processing_classes=[tokenizer], callbacks=[timer])
    trainer.train()
    times = times[1:]  # end of each step
    secs, steps = C.rate(times, args.warmup)
    return {"samples_per_s": steps * args.batch / secs, "step_s": secs / steps, "steps": steps}


# --------------------------------------------------------------------------- held-out accuracy (--heldout)

# Per method on the verifiable task: our overrides of +experiment=pick, TRL's group size and KL beta.
PICK = {"grpo": {"ours": [], "samples": 8, "beta": 0.04},
        "rloo": {"ours": ["stage=rloo", "stage.ppo.per_device_training_batch_size=64"], "samples": 4, "beta": 0.05}}
PICK_PROMPTS_PER_STEP, PICK_EVAL = 16, 400


def pick_overrides(args, out: Path, *overrides: str) -> list[str]:
    """Our command line for the verifiable task: step 3 alone from the SFT model, unless overrides say otherwise."""
    sft = Path(args.work) / "pick" / "sft" / "final"
    given = ["run.stages=[ppo]", f"model.actor={sft}"] if "run.stages=[sft]" not in overrides else []
    return ["+experiment=pick", f"run.output_dir={out}", f"data_blend.cache_dir={Path(args.work) / 'pick_cache'}",
            f"stage.ppo.max_steps={args.heldout}", f"stage.ppo.eval_prompts={PICK_EVAL}", "run.log_interval=1000000",
            *PICK[args.method]["ours"], *given, *overrides]


def pick_config(args, out: Path):
    from hydra import compose, initialize_config_dir

    from pipeline.config import load_config, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(C.ROOT / "conf"), version_base=None):
        return load_config(compose("config", overrides=pick_overrides(args, out)))


def pick_prompts(args) -> tuple[list[dict], list[dict], object]:
    """(train, eval, tokenizer): the ppo slice's training prompts in the order our run visits them (one
    epoch's shuffle, enough for the steps), and its first PICK_EVAL held-out prompts; rows of
    {"ids", "text", "reference"}."""
    from pipeline.data import load_stage_data
    from pipeline.models import load_tokenizer

    cfg = pick_config(args, Path(args.work) / "runs" / "pick_prep")
    tokenizer = load_tokenizer(cfg.tokenizer_source, Path(args.work) / "pick")
    data = load_stage_data(cfg, "ppo", tokenizer)

    def row(r: dict) -> dict:
        return {"ids": r["prompt_input_ids"], "text": tokenizer.decode(r["prompt_input_ids"], skip_special_tokens=True),
                "reference": r["reference"]}

    train = [row(data.train[i]) for i in C.epoch_order(len(data.train), cfg.run.seed)]
    return train[: args.heldout * PICK_PROMPTS_PER_STEP], [row(data.eval[i]) for i in range(PICK_EVAL)], tokenizer


def pick_accuracy(model_dir: Path, rows: list[dict], tokenizer, greedy: bool, seed: int = C.SEED) -> int:
    """How many of `rows` the causal LM in `model_dir` answers right (gsm8k_exact_match >= 0.5), by
    transformers' generate: greedy, or sampled at temperature 1 (no top-k / top-p), 4 new tokens.
    The task's prompts all have the same length, so batches need no padding."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.rewards import REWARD_FUNCTIONS

    score = REWARD_FUNCTIONS["gsm8k_exact_match"]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    right = 0
    for i in range(0, len(rows), 100):
        batch = rows[i:i + 100]
        ids = torch.tensor([r["ids"] for r in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=not greedy,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for r, answer in zip(batch, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)):
            right += score(r["text"], answer, r["reference"]) >= 0.5
    return int(right)


def pick_child_ours(args) -> dict:
    from pipeline.runner import run_pipeline

    out = Path(args.work) / "runs" / f"pick_ours_{args.method}_{time.time_ns()}"
    run_pipeline(pick_config(args, out))
    steps = [r for r in (json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    _, evals, tokenizer = pick_prompts(args)
    rows = len(steps) * PICK_PROMPTS_PER_STEP * PICK[args.method]["samples"]
    return {"samples": rows, "samples_per_s": rows / sum(r["step_s"] for r in steps),
            **{mode: pick_accuracy(out / "ppo" / "final" / "actor", evals, tokenizer, mode == "greedy")
               for mode in ("greedy", "sampled")}}


def pick_child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pipeline.rewards import REWARD_FUNCTIONS

    train, evals, tokenizer = pick_prompts(args)
    cfg = pick_config(args, Path(args.work) / "runs" / "pick_prep")
    p, k, score = cfg.stage.ppo, PICK[args.method]["samples"], REWARD_FUNCTIONS["gsm8k_exact_match"]

    def exact_match(prompts, completions, reference, **_):
        return [score(q, a, ref) for q, a, ref in zip(prompts, completions, reference)]

    times, timer = C.step_timer(first_begin=True)

    grpo = args.method == "grpo"
    out = Path(args.work) / "runs" / f"pick_trl_{args.method}_{time.time_ns()}"
    extra = {"loss_type": "grpo", "scale_rewards": "group"} if grpo else {}  # the GRPO paper's, as ours
    trl_cfg = (GRPOConfig if grpo else RLOOConfig)(
        output_dir=str(out), per_device_train_batch_size=PICK_PROMPTS_PER_STEP * k, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=k, max_completion_length=p.generation.max_new_tokens, temperature=1.0,
        top_p=1.0, top_k=0, beta=PICK[args.method]["beta"], epsilon=p.cliprange, num_iterations=1, max_steps=args.heldout,
        learning_rate=p.actor.optim.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=cfg.run.seed, shuffle_dataset=False, **extra)
    model = AutoModelForCausalLM.from_pretrained(str(Path(args.work) / "pick" / "sft" / "final"), dtype=torch.float32)
    trainer = (GRPOTrainer if grpo else RLOOTrainer)(
        model=model, reward_funcs=[exact_match], args=trl_cfg, processing_class=tokenizer, callbacks=[timer],
        train_dataset=Dataset.from_list([{"prompt": r["text"], "reference": r["reference"]} for r in train]))
    trainer.train()
    trainer.model.save_pretrained(out / "final")
    rows = (len(times) - 1) * PICK_PROMPTS_PER_STEP * k
    return {"samples": rows, "samples_per_s": rows / (times[-1] - times[0]),
            **{mode: pick_accuracy(out / "final", evals, tokenizer, mode == "greedy") for mode in ("greedy", "sampled")}}


def pick_main(args) -> None:
    """--heldout: the SFT model once, each side once, the accuracy table (and a RESULTS.md row)."""
    import torch

    from pipeline.rl_math import difference_interval, wilson_interval

    torch.set_num_threads(C.THREADS)
    work = Path(args.work)
    if not (work / "pick" / "sft" / "final").exists():  # a process of its own: the children inherit no rank variables
        subprocess.run([sys.executable, "-m", "pipeline", *pick_overrides(args, work / "pick", "run.stages=[sft]")],
                       check=True, cwd=str(C.ROOT), env={**os.environ, "OMP_NUM_THREADS": str(C.THREADS)})
    _, evals, tokenizer = pick_prompts(args)
    n = len(evals)
    before = {mode: pick_accuracy(work / "pick" / "sft" / "final", evals, tokenizer, mode == "greedy")
              for mode in ("greedy", "sampled")}
    sides = [args.only] if args.only else ["ours", "trl"]
    runs = {side: C.run_child(__file__, side, args, timeout=1800) for side in sides}

    def accuracy(right: int) -> str:
        low, high = wilson_interval(right, n)
        return f"{right / n:.3f} [{low:.3f}, {high:.3f}]"

    def gain(mode: str, r: dict) -> str:
        low, high = difference_interval(before[mode], n, r[mode], n)
        return f"{(r[mode] - before[mode]) / n:+.3f} [{low:+.3f}, {high:+.3f}]"

    rows = [[side, str(r["samples"]), f"{r['samples_per_s']:.3g}", f"{accuracy(before['greedy'])} -> {accuracy(r['greedy'])}",
             gain("greedy", r), f"{before['sampled'] / n:.3f} -> {accuracy(r['sampled'])}", gain("sampled", r)]
            for side, r in runs.items()]
    print(C.table(["side", "samples", "train samples/s", "greedy before -> after", "greedy gain (95%)",
                   "sampled before -> after", "sampled gain (95%)"], rows))
    if len(runs) == 2 and not args.no_record:
        peer = "GRPOTrainer" if args.method == "grpo" else "RLOOTrainer"
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            f"Verifiable task: {args.method.upper()} vs TRL {peer}, held-out accuracy after the same samples (CPU)",
            f"`python bench/rl_step.py --method {args.method} --heldout STEPS`: both sides train from the same SFT "
            f"model (+experiment=pick) on the same prompts, {PICK_PROMPTS_PER_STEP} prompts x "
            f"{PICK[args.method]['samples']} samples per step, one update per step, exact-match reward, then the "
            f"same evaluator answers the same {n} held-out prompts (greedy and sampled). 95% Wilson intervals; "
            "gains with Newcombe's interval.",
            ["machine", "steps", "samples", "greedy: SFT -> ours / TRL", "greedy gain ours / TRL",
             "sampled: SFT -> ours / TRL", "train samples/s ours / TRL"],
            [C.machine(), str(args.heldout), str(o["samples"]),
             f"{before['greedy'] / n:.3f} -> {o['greedy'] / n:.3f} / {t['greedy'] / n:.3f}",
             f"{gain('greedy', o)} / {gain('greedy', t)}",
             f"{before['sampled'] / n:.3f} -> {o['sampled'] / n:.3f} / {t['sampled'] / n:.3f}",
             f"{o['samples_per_s']:.3g} / {t['samples_per_s']:.3g}"])


def main() -> None:
    ap = C.parser("One RL step: ours (RLHFEngine/PPOTrainer) vs TRL RLOOTrainer / GRPOTrainer", steps=4, warmup=1)
    ap.add_argument("--method", choices=sorted(METHODS), default="ppo",
                    help="ours: ppo (critic, vs RLOOTrainer), rloo (vs RLOOTrainer) or grpo (vs GRPOTrainer)")
    ap.add_argument("--heldout", type=int, metavar="STEPS",
                    help="instead of timing: train STEPS steps of --method grpo or rloo on the verifiable task on each "
                         "side and compare held-out accuracy")
    args = ap.parse_args()
    C.pass_to_child(args, "method", "heldout")
    if args.heldout is not None and args.heldout < 1:
        ap.error(f"--heldout {args.heldout}: the steps each side trains must be >= 1")
    if args.heldout and args.method not in PICK:
        ap.error(f"--heldout compares grpo or rloo, not --method {args.method}")
    if args.child:
        if args.heldout:
            C.emit(pick_child_ours(args) if args.child == "ours" else pick_child_trl(args))
        else:
            C.emit(child_ours(args) if args.child == "ours" else child_trl(args))
        return
    if args.heldout:
        pick_main(args)
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

"""Rollout generation tokens/s, ours vs the Hugging Face generate path TRL uses, A B A B.

    python bench/generation.py               # 2 pairs, 1 warm-up + 5 timed calls, 8 prompts x 64 new tokens
    python bench/generation.py --shape issue18 --dtype bf16 --peer-decoding greedy
                                             # issue #18: our sampling vs transformers' greedy path per token

Ours: the actor's DeepSpeed engine (pipeline.engine.initialize, ZeRO 0, train layout as in step 3)
and `pipeline.rollout.RolloutEngine.generate` (switch to the generation layout, sample, switch
back) - exactly what PPOTrainer.generate_experience calls. Theirs: what TRL's RLOO/GRPO trainers
do without vLLM: `model.generate(**inputs, generation_config=GenerationConfig(do_sample=True,
temperature 1, top_p 1, top_k 0, disable_compile=True))` on the plain model under no_grad.
Same model folder, same left-padded prompt batches (our ppo slice of hh-rlhf), same seed per
call. tokens/s = batch x new positions / seconds, over the calls after warm-up. --shape issue18:
bench/ppo_step.py's model (2 layers, hidden 64, vocab 50272) and prompts of <= 64 tokens;
--peer-decoding greedy: transformers' greedy path (do_sample=False) on the peer's side.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

NEW_TOKENS = 64
SHAPES = {"bench": (C.SHAPE, 128), "issue18": (None, 64)}  # model shape, longest prompt; issue18: ppo_step.SHAPE


def shape(args) -> tuple[dict, int]:
    if args.shape == "issue18":
        import ppo_step

        return ppo_step.SHAPE, SHAPES["issue18"][1]
    return SHAPES[args.shape]


def model_dir(args) -> Path:
    return Path(args.work) / ("model" if args.shape == "bench" else f"model_{args.shape}_{args.dtype}")


def config(args, out: Path) -> dict:
    stage = {"ppo": {"per_device_generation_batch_size": args.batch, "per_device_training_batch_size": args.batch,
                     "generation": {"max_new_tokens": NEW_TOKENS, "do_sample": args.decoding == "sample",
                                    "temperature": 1.0, "top_p": 1.0, "top_k": 0},
                     "actor": {"lora": C.NO_LORA, "strategy": C.STRATEGY},
                     "critic": {"lora": C.NO_LORA, "strategy": C.STRATEGY}, "unsup_coef": 0.0}}
    cfg = C.our_config(Path(args.work), out, ["ppo"], stage, shape(args)[1], 128)
    cfg["run"]["dtype"] = args.dtype
    cfg["model"].update(actor=str(model_dir(args)), reward=str(model_dir(args)))
    return cfg


def prompt_batches(args) -> list[dict]:
    from pipeline.data.collate import collate_prompts

    train = C.stage_data(config(args, Path(args.work) / "prep"), "ppo")
    order = C.epoch_order(len(train))
    pad = C.load_tokenizer().pad_token_id
    return [collate_prompts([train[i] for i in order[s * args.batch:(s + 1) * args.batch]], pad)
            for s in range(args.warmup + args.steps)]


def child(args, side: str) -> dict:
    import torch

    batches = prompt_batches(args)
    tokenizer = C.load_tokenizer()
    folder = str(model_dir(args))
    if side == "ours":
        from pipeline.config import load_config
        from pipeline.dist import init_distributed
        from pipeline.engine import initialize
        from pipeline.models import load_causal_lm
        from pipeline.rollout import RolloutEngine

        cfg = load_config(config(args, Path(args.work) / "runs" / "gen"))
        p = cfg.stage.ppo
        init_distributed(cfg)
        engine = initialize(cfg, load_causal_lm(folder, tokenizer, cfg.dtype, 0.0), p.actor, "stage.ppo.actor",
                            micro_batch=args.batch, grad_accum=1, total_steps=10)
        engine.train()
        rollout = RolloutEngine(engine, tokenizer, p.generation, show_progress=False)
        generate = lambda b: rollout.generate(b["input_ids"], b["attention_mask"])  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM, GenerationConfig

        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        sampling = ({"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if args.peer_decoding == "sample"
                    else {"do_sample": False})
        gen_cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id],
                                   min_p=None, repetition_penalty=1.0, cache_implementation=None, disable_compile=True,
                                   **sampling)

        def generate(b):
            with torch.no_grad():
                return model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], generation_config=gen_cfg)
    secs, cpu_secs, positions = 0.0, 0.0, 0
    for i, b in enumerate(batches):
        torch.manual_seed(C.SEED + i)
        cpu, t0 = time.process_time(), time.perf_counter()
        out = generate(b)
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu
        if i >= args.warmup:
            secs, cpu_secs = secs + dt, cpu_secs + cpu
            positions += out.shape[0] * (out.shape[1] - b["input_ids"].shape[1])
    steps, decode_steps = len(batches) - args.warmup, positions / args.batch
    # CPU ms per decode step: the process's CPU clock, steadier than wall time on a shared machine.
    return {"tokens_per_s": positions / secs, "call_s": secs / steps, "ms_per_decode_step": 1e3 * secs / decode_steps,
            "cpu_ms_per_decode_step": 1e3 * cpu_secs / decode_steps, "steps": steps}


def main() -> None:
    ap = C.parser("Generation tokens/s: our rollout engine vs HF generate (TRL's path)", steps=5, warmup=1)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench", help="model and prompt lengths")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--decoding", choices=["sample", "greedy"], default="sample", help="ours")
    ap.add_argument("--peer-decoding", choices=["sample", "greedy"], default="sample", help="HF generate's")
    args = ap.parse_args()
    C.pass_to_child(args, "shape", "dtype", "decoding", "peer_decoding")
    if args.child:
        C.emit(child(args, args.child))
        return
    import torch

    model_shape, max_prompt = shape(args)
    C.write_opt(model_dir(args), model_shape, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    prompt_batches(args)
    print(f"Generation: {C.opt_shape(model_shape, vocab=False)}; {args.batch} "
          f"hh-rlhf prompts (<= {max_prompt} tokens, left-padded) x {NEW_TOKENS} tokens, ours {args.decoding}, HF "
          f"{args.peer_decoding}; {args.warmup} warm-up + {args.steps} timed calls; {args.dtype} CPU; {args.repeats} x A B",
          flush=True)
    runs = C.ab(__file__, args)
    rows = [[side, C.spread_of(rs, "tokens_per_s"), C.spread_of(rs, "ms_per_decode_step"),
             C.spread_of(rs, "cpu_ms_per_decode_step"), f"{C.median(rs, 'call_s'):.3f}",
             f"{C.median(rs, 'peak_rss_mib'):.0f}"] for side, rs in runs.items()]
    print(C.table(["side", "tokens/s", "ms/decode step", "CPU ms/decode step", "s/call", "peak RSS MiB"], rows))
    r = C.ratios(runs, "tokens_per_s")
    cpu = [t["cpu_ms_per_decode_step"] / o["cpu_ms_per_decode_step"] for o, t in zip(runs.get("ours", []), runs.get("trl", []))]
    if r:
        print(f"ours/HF-generate tokens/s: {C.spread(r)}; by CPU time per decode step: {C.spread(cpu)}")
    if r and not args.no_record and args.shape == "issue18":
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "Generation per token: our sampling vs transformers' greedy path (CPU, issue #18)",
            "`python bench/generation.py --shape issue18 --dtype bf16 --peer-decoding greedy`: bench/ppo_step.py's "
            "model (2 layers, hidden 64, vocab 50272), 8 hh-rlhf prompts (<= 64 tokens) x 64 tokens; ours: the "
            "rollout engine (its own decoding loop) as step 3 runs it, HF: `model.generate(do_sample=False)`. "
            "ms per decode step over the calls after warm-up; median (min-max) over the pairs.",
            ["machine", "dtype", "ours / HF decoding", "calls (warm-up) x pairs", "ours ms/step", "HF ms/step",
             "ratio ours/HF tokens/s", "ours / HF CPU ms/step", "ratio by CPU time"],
            [C.machine(), args.dtype, f"{args.decoding} / {args.peer_decoding}", C.runs_done(args),
             C.spread_of(o, "ms_per_decode_step"), C.spread_of(t, "ms_per_decode_step"), C.spread(r),
             f"{C.spread_of(o, 'cpu_ms_per_decode_step')} / {C.spread_of(t, 'cpu_ms_per_decode_step')}", C.spread(cpu)])
    elif r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "Generation vs HF generate (TRL's path) (CPU)",
            "`python bench/generation.py`: our RolloutEngine on the actor's DeepSpeed engine vs plain "
            "`model.generate` with TRL's GenerationConfig; 8 hh-rlhf prompts (<= 128 tokens) x 64 sampled "
            "tokens, same seed per call; calls after warm-up. Median (min-max) over the pairs.",
            ["machine", "calls (warm-up)", "ours tokens/s", "HF tokens/s", "ratio ours/HF", "peak RSS MiB ours / HF"],
            [C.machine(), C.runs_done(args), C.spread_of(o, "tokens_per_s"), C.spread_of(t, "tokens_per_s"), C.spread(r),
             C.rss_pair(o, t)])


if __name__ == "__main__":
    main()

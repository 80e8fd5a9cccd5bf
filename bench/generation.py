"""Rollout generation tokens/s, ours vs the Hugging Face generate path TRL uses, A B A B.

    python bench/generation.py               # 2 pairs, 1 warm-up + 5 timed calls, 8 prompts x 64 new tokens

Ours: the actor's DeepSpeed engine (pipeline.engine.initialize, ZeRO 0, train layout as in step 3)
and `pipeline.rollout.RolloutEngine.generate` (switch to the generation layout, sample, switch
back) - exactly what PPOTrainer.generate_experience calls. Theirs: what TRL's RLOO/GRPO trainers
do without vLLM: `model.generate(**inputs, generation_config=GenerationConfig(do_sample=True,
temperature 1, top_p 1, top_k 0, disable_compile=True))` on the plain model under no_grad.
Same model folder, same left-padded prompt batches (our ppo slice of hh-rlhf), same seed per
call. tokens/s = batch x new positions / seconds, over the calls after warm-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

MAX_PROMPT, NEW_TOKENS = 128, 64


def config(args, out: Path) -> dict:
    stage = {"ppo": {"per_device_generation_batch_size": args.batch, "per_device_training_batch_size": args.batch,
                     "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
                     "actor": {"lora": C.NO_LORA, "strategy": C.STRATEGY},
                     "critic": {"lora": C.NO_LORA, "strategy": C.STRATEGY}, "unsup_coef": 0.0}}
    return C.our_config(Path(args.work), out, ["ppo"], stage, MAX_PROMPT, 128)


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
    model_dir = str(Path(args.work) / "model")
    if side == "ours":
        from pipeline.config import load_config
        from pipeline.dist import init_distributed
        from pipeline.engine import initialize
        from pipeline.models import load_causal_lm
        from pipeline.rollout import RolloutEngine

        cfg = load_config(config(args, Path(args.work) / "runs" / "gen"))
        p = cfg.stage.ppo
        init_distributed(cfg)
        engine = initialize(cfg, load_causal_lm(model_dir, tokenizer, cfg.dtype, 0.0), p.actor, "stage.ppo.actor",
                            micro_batch=args.batch, grad_accum=1, total_steps=10)
        engine.train()
        rollout = RolloutEngine(engine, tokenizer, p.generation, show_progress=False)
        generate = lambda b: rollout.generate(b["input_ids"], b["attention_mask"])  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM, GenerationConfig

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gen_cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id],
                                   temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                                   cache_implementation=None, disable_compile=True)

        def generate(b):
            with torch.no_grad():
                return model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], generation_config=gen_cfg)
    secs, positions, prompt_tokens = 0.0, 0, 0
    for i, b in enumerate(batches):
        torch.manual_seed(C.SEED + i)
        t0 = time.perf_counter()
        out = generate(b)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            secs += dt
            positions += out.shape[0] * (out.shape[1] - b["input_ids"].shape[1])
            prompt_tokens += int(b["attention_mask"].sum())
    steps = len(batches) - args.warmup
    return {"tokens_per_s": positions / secs, "call_s": secs / steps,
            "ms_per_decode_step": 1e3 * secs / (positions / args.batch), "steps": steps}


def main() -> None:
    ap = C.parser("Generation tokens/s: our rollout engine vs HF generate (TRL's path)", steps=5, warmup=1)
    args = ap.parse_args()
    if args.child:
        C.emit(child(args, args.child))
        return
    C.write_opt(Path(args.work) / "model")
    prompt_batches(args)
    print(f"Generation: OPT {C.SHAPE['num_hidden_layers']} layers, hidden {C.SHAPE['hidden_size']}; {args.batch} hh-rlhf prompts "
          f"(<= {MAX_PROMPT} tokens, left-padded) x {NEW_TOKENS} sampled tokens; {args.warmup} warm-up + {args.steps} timed "
          f"calls; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = [[side, C.spread([r["tokens_per_s"] for r in rs]), f"{C.median(rs, 'ms_per_decode_step'):.1f}",
             f"{C.median(rs, 'call_s'):.3f}", f"{C.median(rs, 'peak_rss_mib'):.0f}"] for side, rs in runs.items()]
    print(C.table(["side", "tokens/s", "ms/decode step", "s/call", "peak RSS MiB"], rows))
    r = C.ratios(runs, "tokens_per_s")
    if r:
        print(f"ours/HF-generate tokens/s: {C.spread(r)}")
    if r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "Generation vs HF generate (TRL's path) (CPU)",
            "`python bench/generation.py`: our RolloutEngine on the actor's DeepSpeed engine vs plain "
            "`model.generate` with TRL's GenerationConfig; 8 hh-rlhf prompts (<= 128 tokens) x 64 sampled "
            "tokens, same seed per call; calls after warm-up. Median (min-max) over the pairs.",
            ["machine", "calls (warm-up)", "ours tokens/s", "HF tokens/s", "ratio ours/HF", "peak RSS MiB ours / HF"],
            [C.machine(), f"{args.steps} ({args.warmup}) x {args.repeats}", C.spread([x["tokens_per_s"] for x in o]),
             C.spread([x["tokens_per_s"] for x in t]), C.spread(r),
             f"{C.median(o, 'peak_rss_mib'):.0f} / {C.median(t, 'peak_rss_mib'):.0f}"])


if __name__ == "__main__":
    main()

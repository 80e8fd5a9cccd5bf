"""SFT throughput, ours vs TRL's SFTTrainer, A B A B in one invocation.

    python bench/sft.py                      # 2 pairs, 2 warm-up + 6 timed steps each, micro-batch 8
    python bench/sft.py --repeats 3 --steps 20

Ours: `pipeline.runner.run_pipeline` with run.stages=[sft] (stages/sft.py as users run it: DeepSpeed
engine, ZeRO 0, fp32, AdamW, cosine schedule, clipping 1.0); the time of each `engine.step()` is
recorded by wrapping `pipeline.training.initialize`, which builds the stage's engine. Theirs:
`trl.SFTTrainer` on the same model folder, the same tokenized examples in the same order (a sequential
sampler over our epoch order), the same micro-batch, max length, optimizer settings, fp32 on CPU, no
gradient checkpointing, no eval/saving/logging. samples/s and tokens/s (non-pad tokens) count the steps
after warm-up only; the start-up and our before/after evaluation are outside the timed span.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

LR = 1e-4
MAX_PROMPT, MAX_ANSWER = 128, 128


def config(args, out: Path) -> dict:
    return C.our_config(Path(args.work), out, ["sft"], {"sft": C.stage_settings(args, LR, 16)}, MAX_PROMPT, MAX_ANSWER)


def ordered_examples(args) -> list[dict]:
    return C.in_epoch_order(C.stage_data(config(args, Path(args.work) / "prep"), "sft"))


def timed_tokens(examples: list[dict], args) -> tuple[int, int]:
    """(non-pad tokens, padded tokens) of the timed steps' batches."""
    real = padded = 0
    for s in range(args.warmup, args.warmup + args.steps):
        lens = [len(e["input_ids"]) for e in examples[s * args.batch:(s + 1) * args.batch]]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return real, padded


def child_ours(args) -> list[float]:
    return C.run_ours_timed(config(args, Path(args.work) / "runs" / f"ours_sft_{time.time_ns()}"))


def child_trl(args) -> list[float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples = ordered_examples(args)
    n = (args.warmup + args.steps) * args.batch
    ds = Dataset.from_list([{"input_ids": e["input_ids"]} for e in examples[:n]])
    cfg = SFTConfig(**C.trl_training_args(args, "sft", LR), max_length=MAX_PROMPT + MAX_ANSWER + 1, packing=False,
                    shuffle_dataset=False)
    times, _ = C.train_in_order(SFTTrainer, model=C.load_fp32(Path(args.work) / "model"), args=cfg, train_dataset=ds,
                                processing_class=C.load_tokenizer())
    return times


def main() -> None:
    ap = C.parser("SFT samples/s and tokens/s: ours vs TRL SFTTrainer", steps=6, warmup=2)
    args = ap.parse_args()
    if args.child:
        times = child_ours(args) if args.child == "ours" else child_trl(args)
        secs, n = C.rate(times, args.warmup)
        real, padded = timed_tokens(ordered_examples(args), args)
        C.emit({"samples_per_s": n * args.batch / secs, "tokens_per_s": real / secs, "padded_tokens_per_s": padded / secs,
                "step_s": secs / n, "steps": n})
        return
    work = Path(args.work)
    C.write_opt(work / "model")
    ordered_examples(args)  # data prepared once, outside the timed runs
    print(f"SFT: {C.opt_shape(C.SHAPE)}; "
          f"hh-rlhf helpful-base, OPT tokenizer, prompt <= {MAX_PROMPT} + answer <= {MAX_ANSWER}; micro-batch {args.batch}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = [[side, C.spread_of(rs, "samples_per_s"), C.spread_of(rs, "tokens_per_s"), f"{C.median(rs, 'step_s'):.3f}",
             f"{C.median(rs, 'peak_rss_mib'):.0f}"] for side, rs in runs.items()]
    print(C.table(["side", "samples/s", "tokens/s", "s/step", "peak RSS MiB"], rows))
    r = C.print_ratios(runs, "samples_per_s", "samples/s")
    if r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "SFT vs TRL SFTTrainer (CPU)",
            "`python bench/sft.py`: OPT 4 layers / hidden 256 / vocab 50272 random-init, hh-rlhf helpful-base "
            "with the OPT tokenizer (prompt <= 128 + answer <= 128 tokens), micro-batch 8, fp32, AdamW, "
            "same examples in the same order on both sides; steps after warm-up only. Figures: median "
            "(min-max) over the A B pairs; ratio = ours / TRL per pair.",
            ["machine", "steps (warm-up)", "ours samples/s", "TRL samples/s", "ours tokens/s", "TRL tokens/s",
             "ratio ours/TRL", "peak RSS MiB ours / TRL"],
            [C.machine(), C.runs_done(args), C.spread_of(o, "samples_per_s"), C.spread_of(t, "samples_per_s"),
             C.spread_of(o, "tokens_per_s"), C.spread_of(t, "tokens_per_s"), C.spread(r), C.rss_pair(o, t)])


if __name__ == "__main__":
    main()

"""Reward-model throughput, ours vs TRL's RewardTrainer, A B A B in one invocation.

    python bench/rm.py                       # 2 pairs, 2 warm-up + 6 timed steps each, 8 pairs per micro-batch

Ours: `pipeline.runner.run_pipeline` with run.stages=[rm] (stages/rm.py: RewardModel = OPT base + value
head, DeepSpeed ZeRO 0, fp32, pairwise loss over the diverging tokens); each `engine.step()` is timed by
wrapping `pipeline.training.initialize`, which builds the stage's engine. Theirs: `trl.RewardTrainer`
with `OPTForSequenceClassification` (num_labels 1) from the same model folder, the same tokenized pairs
in the same order (chosen and rejected padded together into one 2B batch on both sides), same optimizer
settings, no eval/saving/logging. pairs/s counts the steps after warm-up only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

LR = 5e-5
MAX_PROMPT, MAX_ANSWER = 128, 128


def config(args, out: Path) -> dict:
    return C.our_config(Path(args.work), out, ["rm"], {"rm": C.stage_settings(args, LR, 16)}, MAX_PROMPT, MAX_ANSWER)


def ordered_examples(args) -> list[dict]:
    return C.in_epoch_order(C.stage_data(config(args, Path(args.work) / "prep"), "rm"))


def timed_tokens(examples: list[dict], args) -> int:
    real = 0
    for s in range(args.warmup, args.warmup + args.steps):
        for e in examples[s * args.batch:(s + 1) * args.batch]:
            real += len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
    return real


def child_ours(args) -> list[float]:
    return C.run_ours_timed(config(args, Path(args.work) / "runs" / f"ours_rm_{time.time_ns()}"))


def child_trl(args) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    examples = ordered_examples(args)
    n = (args.warmup + args.steps) * args.batch
    ds = Dataset.from_list([{"chosen_ids": e["chosen_input_ids"], "rejected_ids": e["rejected_input_ids"]}
                            for e in examples[:n]])
    tokenizer = C.load_tokenizer()
    model = C.load_fp32(Path(args.work) / "model", AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    cfg = RewardConfig(**C.trl_training_args(args, "rm", LR), max_length=MAX_PROMPT + MAX_ANSWER + 1)
    times, _ = C.train_in_order(RewardTrainer, model=model, args=cfg, train_dataset=ds, processing_class=tokenizer)
    return times


def main() -> None:
    ap = C.parser("RM pairs/s: ours vs TRL RewardTrainer", steps=6, warmup=2)
    args = ap.parse_args()
    if args.child:
        times = child_ours(args) if args.child == "ours" else child_trl(args)
        secs, n = C.rate(times, args.warmup)
        C.emit({"pairs_per_s": n * args.batch / secs, "tokens_per_s": timed_tokens(ordered_examples(args), args) / secs,
                "step_s": secs / n, "steps": n})
        return
    C.write_opt(Path(args.work) / "model")
    ordered_examples(args)
    print(f"RM: {C.opt_shape(C.SHAPE, vocab=False)} + scalar head; hh-rlhf pairs, "
          f"prompt <= {MAX_PROMPT} + answer <= {MAX_ANSWER}; {args.batch} pairs per micro-batch; "
          f"{args.warmup} warm-up + {args.steps} timed steps; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = [[side, C.spread_of(rs, "pairs_per_s"), C.spread_of(rs, "tokens_per_s"), f"{C.median(rs, 'step_s'):.3f}",
             f"{C.median(rs, 'peak_rss_mib'):.0f}"] for side, rs in runs.items()]
    print(C.table(["side", "pairs/s", "tokens/s", "s/step", "peak RSS MiB"], rows))
    r = C.print_ratios(runs, "pairs_per_s", "pairs/s")
    if r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "RM vs TRL RewardTrainer (CPU)",
            "`python bench/rm.py`: same model shape and data as the SFT bench, 8 pairs (16 sequences) per "
            "micro-batch; ours = OPT base + value head with the per-token pairwise loss, TRL = "
            "OPTForSequenceClassification with its last-token loss (same transformer work). Median (min-max) over the pairs.",
            ["machine", "steps (warm-up)", "ours pairs/s", "TRL pairs/s", "ratio ours/TRL", "peak RSS MiB ours / TRL"],
            [C.machine(), C.runs_done(args), C.spread_of(o, "pairs_per_s"), C.spread_of(t, "pairs_per_s"), C.spread(r),
             C.rss_pair(o, t)])


if __name__ == "__main__":
    main()

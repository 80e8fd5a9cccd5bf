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


def stage_cfg(args) -> dict:
    return {"sft": {"per_device_train_batch_size": args.batch, "per_device_eval_batch_size": 16,
                    "max_steps": args.warmup + args.steps, "lora": C.NO_LORA, "strategy": C.STRATEGY,
                    "optim": {"learning_rate": LR, "weight_decay": 0.0, "lr_scheduler_type": "cosine",
                              "num_warmup_steps": 0, "gradient_clipping": 1.0}}}


def config(args, out: Path) -> dict:
    return C.our_config(Path(args.work), out, ["sft"], stage_cfg(args), MAX_PROMPT, MAX_ANSWER)


def ordered_examples(args) -> list[dict]:
    train = C.stage_data(config(args, Path(args.work) / "prep"), "sft")
    return [train[i] for i in C.epoch_order(len(train))]


def timed_tokens(examples: list[dict], args) -> tuple[int, int]:
    """(non-pad tokens, padded tokens) of the timed steps' batches."""
    real = padded = 0
    for s in range(args.warmup, args.warmup + args.steps):
        lens = [len(e["input_ids"]) for e in examples[s * args.batch:(s + 1) * args.batch]]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return real, padded


def child_ours(args) -> list[float]:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    times = C.time_engine_steps()
    out = Path(args.work) / "runs" / f"ours_sft_{time.time_ns()}"
    run_pipeline(load_config(config(args, out)))
    return times


def child_trl(args) -> list[float]:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    examples = ordered_examples(args)
    n = (args.warmup + args.steps) * args.batch
    ds = Dataset.from_list([{"input_ids": e["input_ids"]} for e in examples[:n]])
    tokenizer = C.load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(Path(args.work) / "model"), dtype=torch.float32)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    class InOrder(SFTTrainer):  # our epoch order, not a fresh shuffle: identical batches
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    cfg = SFTConfig(
        output_dir=str(Path(args.work) / "runs" / f"trl_sft_{time.time_ns()}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, max_length=MAX_PROMPT + MAX_ANSWER + 1,
        packing=False, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=C.SEED, shuffle_dataset=False)
    trainer = InOrder(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
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
    print(f"SFT: OPT {C.SHAPE['num_hidden_layers']} layers, hidden {C.SHAPE['hidden_size']}, vocab {C.SHAPE['vocab_size']}; "
          f"hh-rlhf helpful-base, OPT tokenizer, prompt <= {MAX_PROMPT} + answer <= {MAX_ANSWER}; micro-batch {args.batch}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = []
    for side, rs in runs.items():
        rows.append([side, C.spread([r["samples_per_s"] for r in rs]), C.spread([r["tokens_per_s"] for r in rs]),
                     f"{C.median(rs, 'step_s'):.3f}", f"{C.median(rs, 'peak_rss_mib'):.0f}"])
    print(C.table(["side", "samples/s", "tokens/s", "s/step", "peak RSS MiB"], rows))
    r = C.ratios(runs, "samples_per_s")
    if r:
        print(f"ours/TRL samples/s: {C.spread(r)}  ({C.verdict(r, 1.0)})")
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
            [C.machine(), f"{args.steps} ({args.warmup}) x {args.repeats}",
             C.spread([x["samples_per_s"] for x in o]), C.spread([x["samples_per_s"] for x in t]),
             C.spread([x["tokens_per_s"] for x in o]), C.spread([x["tokens_per_s"] for x in t]),
             C.spread(r), f"{C.median(o, 'peak_rss_mib'):.0f} / {C.median(t, 'peak_rss_mib'):.0f}"])


if __name__ == "__main__":
    main()

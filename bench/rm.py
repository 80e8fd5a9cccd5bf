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
    stage = {"rm": {"per_device_train_batch_size": args.batch, "per_device_eval_batch_size": 16,
                    "max_steps": args.warmup + args.steps, "lora": C.NO_LORA, "strategy": C.STRATEGY,
                    "optim": {"learning_rate": LR, "weight_decay": 0.0, "lr_scheduler_type": "cosine",
                              "num_warmup_steps": 0, "gradient_clipping": 1.0}}}
    return C.our_config(Path(args.work), out, ["rm"], stage, MAX_PROMPT, MAX_ANSWER)


def ordered_examples(args) -> list[dict]:
    train = C.stage_data(config(args, Path(args.work) / "prep"), "rm")
    return [train[i] for i in C.epoch_order(len(train))]


def timed_tokens(examples: list[dict], args) -> int:
    real = 0
    for s in range(args.warmup, args.warmup + args.steps):
        for e in examples[s * args.batch:(s + 1) * args.batch]:
            real += len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
    return real


def child_ours(args) -> list[float]:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    times = C.time_engine_steps()
    run_pipeline(load_config(config(args, Path(args.work) / "runs" / f"ours_rm_{time.time_ns()}")))
    return times


def child_trl(args) -> list[float]:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    examples = ordered_examples(args)
    n = (args.warmup + args.steps) * args.batch
    ds = Dataset.from_list([{"chosen_ids": e["chosen_input_ids"], "rejected_ids": e["rejected_input_ids"]}
                            for e in examples[:n]])
    tokenizer = C.load_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(str(Path(args.work) / "model"), num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    cfg = RewardConfig(
        output_dir=str(Path(args.work) / "runs" / f"trl_rm_{time.time_ns()}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, max_length=MAX_PROMPT + MAX_ANSWER + 1,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=C.SEED)
    trainer = InOrder(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
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
    print(f"RM: OPT {C.SHAPE['num_hidden_layers']} layers, hidden {C.SHAPE['hidden_size']} + scalar head; hh-rlhf pairs, "
          f"prompt <= {MAX_PROMPT} + answer <= {MAX_ANSWER}; {args.batch} pairs per micro-batch; "
          f"{args.warmup} warm-up + {args.steps} timed steps; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = [[side, C.spread([r["pairs_per_s"] for r in rs]), C.spread([r["tokens_per_s"] for r in rs]),
             f"{C.median(rs, 'step_s'):.3f}", f"{C.median(rs, 'peak_rss_mib'):.0f}"] for side, rs in runs.items()]
    print(C.table(["side", "pairs/s", "tokens/s", "s/step", "peak RSS MiB"], rows))
    r = C.ratios(runs, "pairs_per_s")
    if r:
        print(f"ours/TRL pairs/s: {C.spread(r)}  ({C.verdict(r, 1.0)})")
    if r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "RM vs TRL RewardTrainer (CPU)",
            "`python bench/rm.py`: same model shape and data as the SFT bench, 8 pairs (16 sequences) per "
            "micro-batch; ours = OPT base + value head with the per-token pairwise loss, TRL = "
            "OPTForSequenceClassification with its last-token loss (same transformer work). Median (min-max) over the pairs.",
            ["machine", "steps (warm-up)", "ours pairs/s", "TRL pairs/s", "ratio ours/TRL", "peak RSS MiB ours / TRL"],
            [C.machine(), f"{args.steps} ({args.warmup}) x {args.repeats}", C.spread([x["pairs_per_s"] for x in o]),
             C.spread([x["pairs_per_s"] for x in t]), C.spread(r),
             f"{C.median(o, 'peak_rss_mib'):.0f} / {C.median(t, 'peak_rss_mib'):.0f}"])


if __name__ == "__main__":
    main()

"""DPO step, ours vs TRL's DPOTrainer, A B A B in one invocation; then the held-out preference
accuracy each side's policy reaches after the same number of pairs.

    python bench/dpo.py                      # 2 pairs, 2 warm-up + 6 timed steps each, 8 pairs per micro-batch

Ours: `pipeline.runner.run_pipeline` with run.stages=[dpo] and model.actor = the bench model folder
(stages/dpo.py as users run it: the policy a DeepSpeed engine at ZeRO 0, the frozen reference a plain
module, one forward of each over the 2B chosen and rejected rows, fp32, AdamW, cosine schedule, clipping
1.0); each `engine.step()` is timed by wrapping `pipeline.training.initialize`, which builds the stage's
engine. Theirs: `trl.DPOTrainer` with the same model folder as policy and reference, the same tokenized
pairs (prompt, chosen and rejected ids from our data layer, so TRL's own tokenization is skipped) in the
same order (a sequential sampler over our epoch order), beta 0.1, sigmoid loss, the same optimizer
settings, no eval/saving/logging. pairs/s counts the steps after warm-up; peak RSS is taken when
training ends.

Held-out accuracy: after training, each child scores the same held-out pairs (the rm slice's eval
split) with one function, stages/dpo.py's pair_step: implicit reward beta * (policy - reference)
log-ratio of the chosen answer above the rejected one, the reference being the start model; with its
Wilson 95% interval.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

LR = 1e-4
BETA = 0.1
MAX_PROMPT, MAX_ANSWER = 128, 128
EVAL_FRACTION = 0.2  # of the rm slice's 480 pairs: 96 held out


def config(args, out: Path) -> dict:
    stage = {"dpo": {**C.stage_settings(args, LR, 8), "beta": BETA, "offload_reference_model": False}}
    cfg = C.our_config(Path(args.work), out, ["dpo"], stage, MAX_PROMPT, MAX_ANSWER)
    cfg["data_blend"]["eval_fraction"] = EVAL_FRACTION
    return cfg


def stage_data(args):
    from pipeline.config import load_config
    from pipeline.data import load_stage_data

    return load_stage_data(load_config(config(args, Path(args.work) / "prep")), "dpo", C.load_tokenizer())


def ordered_examples(args) -> list[dict]:
    return C.in_epoch_order(stage_data(args).train)


def held_out(policy, args) -> dict:
    """Held-out preference accuracy of `policy` (a causal LM) against the start model, and its interval."""
    import torch

    from pipeline.config import DPOSection
    from pipeline.rl_math import preference_accuracy, wilson_interval
    from pipeline.stages.dpo import collate_preferences, pair_step

    pairs = stage_data(args).eval
    reference = C.load_fp32(Path(args.work) / "model").eval()
    policy.eval()
    pad, settings = C.load_tokenizer().pad_token_id, DPOSection(beta=BETA)
    correct = margin = 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), 8):
            _, chosen, rejected, _ = pair_step(policy, reference, collate_preferences(pairs[start:start + 8], pad), settings)
            correct += float(preference_accuracy(chosen, rejected)) * len(chosen)
            margin += float((chosen - rejected).sum())
    low, high = wilson_interval(correct, len(pairs))
    return {"accuracy": correct / len(pairs), "accuracy_low": low, "accuracy_high": high,
            "margin": margin / len(pairs), "eval_pairs": len(pairs)}


def child_ours(args) -> tuple[list[float], object]:
    out = Path(args.work) / "runs" / f"ours_dpo_{time.time_ns()}"
    times = C.run_ours_timed(config(args, out))
    return times, C.load_fp32(out / "dpo" / "final")


def child_trl(args) -> tuple[list[float], object]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    examples = ordered_examples(args)[: (args.warmup + args.steps) * args.batch]
    ds = Dataset.from_list([{"prompt_ids": e["chosen_input_ids"][: e["prompt_len"]],
                             "chosen_ids": e["chosen_input_ids"][e["prompt_len"]:],
                             "rejected_ids": e["rejected_input_ids"][e["prompt_len"]:]} for e in examples])
    model_dir = Path(args.work) / "model"

    class Pretokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset  # already tokenized by our data layer: the same ids on both sides

    cfg = DPOConfig(**C.trl_training_args(args, "dpo", LR), beta=BETA, loss_type=["sigmoid"],
                    max_length=MAX_PROMPT + MAX_ANSWER, precompute_ref_log_probs=False)
    times, trainer = C.train_in_order(Pretokenized, model=C.load_fp32(model_dir), ref_model=C.load_fp32(model_dir),
                                      args=cfg, train_dataset=ds, processing_class=C.load_tokenizer())
    return times, trainer.model


def main() -> None:
    ap = C.parser("DPO pairs/s and held-out preference accuracy: ours vs TRL DPOTrainer", steps=6, warmup=2)
    args = ap.parse_args()
    if args.child:
        times, policy = child_ours(args) if args.child == "ours" else child_trl(args)
        peak = C.peak_rss_mib()  # training's peak, before the held-out scoring loads a second model
        secs, n = C.rate(times, args.warmup)
        C.emit({"pairs_per_s": n * args.batch / secs, "step_s": secs / n, "steps": n, "peak_rss_mib": peak,
                **held_out(policy, args)})
        return
    C.write_opt(Path(args.work) / "model")
    data = stage_data(args)
    print(f"DPO: {C.opt_shape(C.SHAPE)} "
          f"(policy and reference); hh-rlhf pairs, prompt <= {MAX_PROMPT} + answer <= {MAX_ANSWER}; {args.batch} pairs "
          f"per micro-batch; {args.warmup} warm-up + {args.steps} timed steps ({(args.warmup + args.steps) * args.batch} "
          f"pairs); {len(data.eval)} held-out pairs; beta {BETA}, lr {LR}; fp32 CPU; {args.repeats} x A B", flush=True)
    runs = C.ab(__file__, args)
    rows = [[side, C.spread_of(rs, "pairs_per_s"), f"{C.median(rs, 'step_s'):.3f}",
             f"{C.median(rs, 'peak_rss_mib'):.0f}",
             f"{C.median(rs, 'accuracy'):.3f} ({C.median(rs, 'accuracy_low'):.3f}-{C.median(rs, 'accuracy_high'):.3f})",
             f"{C.median(rs, 'margin'):.4f}"] for side, rs in runs.items()]
    print(C.table(["side", "pairs/s", "s/step", "peak RSS MiB", "held-out accuracy (95%)", "held-out margin"], rows))
    r = C.print_ratios(runs, "pairs_per_s", "pairs/s")
    if r and not args.no_record:
        o, t = runs["ours"], runs["trl"]
        C.append_result(
            "DPO vs TRL DPOTrainer (CPU)",
            "`python bench/dpo.py`: same model shape and data as the SFT and RM benches (the random-init model is the "
            "policy's start and the reference), 8 pairs (16 sequences) per micro-batch through each model, beta 0.1, "
            "sigmoid loss, lr 1e-4 cosine. Held-out accuracy: implicit reward of chosen above rejected on the rm slice's "
            "held-out pairs after the same pairs on both sides, scored by one function (Wilson 95% interval). Median "
            "(min-max) over the pairs.",
            ["machine", "steps (warm-up)", "ours pairs/s", "TRL pairs/s", "ratio ours/TRL", "peak RSS MiB ours / TRL",
             "held-out accuracy ours / TRL", "held-out margin ours / TRL"],
            [C.machine(), C.runs_done(args), C.spread_of(o, "pairs_per_s"), C.spread_of(t, "pairs_per_s"), C.spread(r),
             C.rss_pair(o, t),
             f"{C.median(o, 'accuracy'):.3f} ({C.median(o, 'accuracy_low'):.3f}-{C.median(o, 'accuracy_high'):.3f}) / "
             f"{C.median(t, 'accuracy'):.3f} ({C.median(t, 'accuracy_low'):.3f}-{C.median(t, 'accuracy_high'):.3f})",
             f"{C.median(o, 'margin'):.4f} / {C.median(t, 'margin'):.4f}"])


if __name__ == "__main__":
    main()

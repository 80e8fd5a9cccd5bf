"""Step 2: reward model = transformer + scalar value head, trained on preference pairs with
DeepSpeed-Chat's pairwise ranking loss (pipeline.rl_math.pairwise_ranking_loss).

Reads: model.reward, data_blend (the rm slice), stage.rm.
Writes: rm/final (transformers' XForSequenceClassification with one label: AutoModelForSequenceClassification
loads it; pipeline.models.RewardModel.from_pretrained gives its per-token values), rm/metrics.jsonl,
rm/checkpoints/.
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.config import RunConfig
from pipeline.data import load_stage_data
from pipeline.data.collate import collate_pairs
from pipeline.dist import all_reduce_mean
from pipeline.engine import zero3_construction
from pipeline.export import save_hf
from pipeline.models import RewardModel, materialize
from pipeline.resume import stop_requested
from pipeline.rl_math import pairwise_ranking_loss
from pipeline.tracking import MetricsLogger
from pipeline.training import (
    NonFiniteGuard,
    StageContext,
    accumulation_batches,
    engine_and_budget,
    eval_batches,
    resume_or_evaluate,
)


def pair_loss(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, chosen scores (B,), rejected scores (B,) of a collate_pairs batch."""
    values = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    half = values.shape[0] // 2
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return pairwise_ranking_loss(values[:half], values[half:], ids[:half], ids[half:], mask[:half], mask[half:])


def run(cfg: RunConfig, ctx: StageContext) -> dict:
    s = cfg.stage.rm
    out = cfg.stage_dir("rm")
    tokenizer = ctx.tokenizer
    logger = MetricsLogger(out, "rm", ctx.is_main, cfg.run.log_interval)

    # ---- data
    data = load_stage_data(cfg, "rm", tokenizer)
    if ctx.is_main:
        print(data.summary("rm"), flush=True)
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)

    # ---- model and engine
    source = materialize(cfg.model.reward, ctx.work_dir, len(tokenizer), cfg.run.seed)
    with zero3_construction(cfg, s.strategy):
        model = RewardModel.from_base(source, tokenizer, cfg.dtype, cfg.model.dropout, cfg.model.trust_remote_code)
    engine, n_steps, per_epoch, tp = engine_and_budget(cfg, model, s, "stage.rm", len(data.train))

    def evaluate() -> dict[str, float]:
        """Held-out accuracy (chosen scored above rejected), mean chosen and rejected score, loss."""
        engine.eval()
        correct = chosen_sum = rejected_sum = loss_sum = 0.0
        pairs = 0
        with torch.no_grad():
            for batch in eval_batches(data.eval, s.per_device_eval_batch_size, collate, tp):
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                loss, chosen, rejected = pair_loss(engine, batch)
                correct += float((chosen > rejected).sum())
                chosen_sum += float(chosen.sum())
                rejected_sum += float(rejected.sum())
                loss_sum += float(loss) * len(chosen)
                pairs += len(chosen)
        engine.train()
        n = max(pairs, 1)
        acc, mc, mr, ml = all_reduce_mean([correct / n, chosen_sum / n, rejected_sum / n, loss_sum / n], pairs)
        return {"accuracy": acc, "chosen_score": mc, "rejected_score": mr, "loss": ml}

    # ---- resume (or evaluate the start)
    checkpointer, step, before = resume_or_evaluate(cfg, ctx, "rm", s, logger, {"reward": engine}, evaluate)

    # ---- train
    logger.begin(n_steps, step)
    guard = NonFiniteGuard()
    engine.train()
    epoch = step // per_epoch if per_epoch else 0
    while step < n_steps:
        micro = 0
        for batch in accumulation_batches(data.train, s.per_device_train_batch_size, s.gradient_accumulation_steps,
                                          collate, cfg.run.seed, epoch, step, per_epoch, tp):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss, chosen, rejected = pair_loss(engine, batch)
            if not guard.ok(loss, f"rm step {step}"):
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            if micro % s.gradient_accumulation_steps:
                continue
            step += 1
            logger.log(step, "train", loss=float(loss.detach()), accuracy=float((chosen > rejected).float().mean()),
                       chosen_score=float(chosen.detach().mean()), rejected_score=float(rejected.detach().mean()), lr=engine.get_lr()[0])
            if s.eval_interval and step % s.eval_interval == 0:
                logger.log(step, "eval", **evaluate())
            if checkpointer.due(step) or stop_requested():
                checkpointer.save(step, {"reward": engine}, {"epoch": epoch, "eval_before": before})
                stop_requested(exit_if_set=True)
            if step >= n_steps:
                break
        epoch += 1

    # ---- evaluate and write
    after = evaluate()
    logger.log(step, "eval", **after)
    save_hf(engine, out / "final", tokenizer)
    return {"steps": step, "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "chosen_score": after["chosen_score"], "rejected_score": after["rejected_score"],
            "skipped_steps": guard.skipped}

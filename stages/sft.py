"""Step 1: supervised fine-tuning of the actor on prompt + chosen answer (causal-LM loss).

Reads: model.actor (catalog alias, hub id or folder), data_blend (the sft slice), stage.sft.
Writes: sft/final (Hugging Face causal LM + tokenizer), sft/metrics.jsonl, sft/checkpoints/.
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.checkpoint import Checkpointer
from pipeline.config import RunConfig
from pipeline.data import load_stage_data
from pipeline.data.collate import collate_sft
from pipeline.dist import all_reduce_mean
from pipeline.engine import zero3_construction
from pipeline.export import save_hf
from pipeline.models import load_causal_lm, materialize
from pipeline.resume import resume_stage, stop_requested
from pipeline.tracking import MetricsLogger
from pipeline.training import (
    NonFiniteGuard,
    StageContext,
    accumulation_batches,
    engine_and_budget,
    eval_batches,
    perplexity,
)


def run(cfg: RunConfig, ctx: StageContext) -> dict:
    s = cfg.stage.sft
    out = cfg.stage_dir("sft")
    tokenizer = ctx.tokenizer
    logger = MetricsLogger(out, "sft", ctx.is_main, cfg.run.log_interval)

    # ---- data
    data = load_stage_data(cfg, "sft", tokenizer)
    if ctx.is_main:
        print(data.summary("sft"), flush=True)
    collate = partial(collate_sft, pad_id=tokenizer.pad_token_id, mask_prompt=s.mask_prompt)

    # ---- model and engine
    source = materialize(cfg.model.actor, ctx.work_dir, len(tokenizer), cfg.run.seed)
    with zero3_construction(cfg, s.strategy):
        model = load_causal_lm(source, tokenizer, cfg.dtype, cfg.model.dropout, cfg.model.trust_remote_code)
    engine, n_steps, per_epoch, tp = engine_and_budget(cfg, model, s, "stage.sft", len(data.train))

    def evaluate() -> float:
        engine.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in eval_batches(data.eval, s.per_device_eval_batch_size, collate, tp):
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(engine(**batch).loss) * n
                tokens += n
        engine.train()
        return all_reduce_mean([total / max(tokens, 1)], tokens)[0]

    # ---- resume
    checkpointer = Checkpointer(out, s.checkpoint.every_steps, s.checkpoint.every_minutes, s.checkpoint.keep,
                                ctx.config)
    state = resume_stage(cfg, checkpointer, "sft", logger, {"actor": engine})
    step = state["step"]
    eval_before = state.get("eval_loss_before")
    if eval_before is None:
        eval_before = evaluate()
        logger.log(0, "eval", loss=eval_before, perplexity=perplexity(eval_before))

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
            loss = engine(**batch).loss
            if not guard.ok(loss, f"sft step {step}"):
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            if micro % s.gradient_accumulation_steps:
                continue
            step += 1
            logger.log(step, "train", loss=float(loss.detach()), lr=engine.get_lr()[0], epoch=epoch)
            if s.eval_interval and step % s.eval_interval == 0:
                logger.log(step, "eval", loss=(el := evaluate()), perplexity=perplexity(el))
            if checkpointer.due(step) or stop_requested():
                checkpointer.save(step, {"actor": engine}, {"epoch": epoch, "eval_loss_before": eval_before})
                stop_requested(exit_if_set=True)
            if step >= n_steps:
                break
        epoch += 1

    # ---- evaluate and write
    eval_after = evaluate()
    logger.log(step, "eval", loss=eval_after, perplexity=perplexity(eval_after))
    save_hf(engine, out / "final", tokenizer)
    return {"steps": step, "eval_loss_before": eval_before, "eval_loss_after": eval_after,
            "perplexity_after": perplexity(eval_after), "skipped_steps": guard.skipped}

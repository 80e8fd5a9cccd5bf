"""DPO in place of steps 2 and 3 (run.stages=[sft,dpo]): direct preference optimisation of the policy
on preference pairs against a frozen reference, with no reward model and no sampling.

The policy starts from sft/final (or model.actor when SFT is not part of the run); the reference is a
frozen copy of that start, offloadable to host RAM (stage.dpo.offload_reference_model). Each micro-batch
of B pairs is one forward of the reference and one of the policy over the 2B chosen and rejected rows
(prompt tokens masked); the answers' log-probabilities go into pipeline.rl_math.dpo_loss (DPO with
label smoothing, or IPO). Logged per step and per evaluation: the loss, the implicit rewards
beta * (policy - reference) log-ratio of the chosen and the rejected answers and their margin, and the
preference accuracy (chosen reward above rejected); held-out before and after training, with Wilson 95%
intervals, beside the policy's own ranking (chosen answer more likely than rejected).

Reads: sft/final or model.actor, data_blend (the rm slice: DeepSpeed-Chat's DPO trains on step 2's pairs), stage.dpo.
Writes: dpo/final (Hugging Face causal LM + tokenizer), dpo/metrics.jsonl, dpo/checkpoints/.
"""

from __future__ import annotations

from functools import partial

import torch

from pipeline.config import DPOSection, RunConfig
from pipeline.data import load_stage_data
from pipeline.data.collate import collate_pairs
from pipeline.dist import all_reduce_mean
from pipeline.engine import inference_engine, zero3_construction
from pipeline.export import save_hf
from pipeline.models import load_causal_lm
from pipeline.resume import stop_requested
from pipeline.rl_math import dpo_loss, preference_accuracy, sequence_logprobs, wilson_interval
from pipeline.tracking import MetricsLogger
from pipeline.training import (
    NonFiniteGuard,
    StageContext,
    accumulation_batches,
    engine_and_budget,
    eval_batches,
    resume_or_evaluate,
)

EVAL_KEYS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "policy_accuracy")


def collate_preferences(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_pairs' input_ids and attention_mask (2B, L), the B chosen rows then the B rejected
    rows, right-padded; plus prompt_len (2B,), where each row's answer starts."""
    out = collate_pairs(batch, pad_id)
    out["prompt_len"] = torch.tensor([b["prompt_len"] for b in batch]).repeat(2)
    return out


def answer_logprobs(model, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """(2B,) log-probabilities of each row's answer tokens (summed, or per-token means with `average`).
    The LM head projects only the positions from the shortest prompt on (transformers' logits_to_keep)."""
    ids, attention, prompt_len = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    start = int(prompt_len.min())
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False,
                   logits_to_keep=ids.shape[1] - start + 1).logits[:, :-1]
    positions = torch.arange(start, ids.shape[1], device=ids.device)
    answer = attention[:, start:] * (positions[None, :] >= prompt_len[:, None])
    return sequence_logprobs(logits, ids[:, start:], answer, average)


def pair_step(policy, reference, batch: dict[str, torch.Tensor], d: DPOSection):
    """(loss, chosen rewards (B,), rejected rewards (B,), the policy's answer log-probs (2B,), detached)."""
    average = d.loss_type == "ipo"  # IPO's log-ratios are per-token means (as TRL's)
    with torch.no_grad():
        ref = answer_logprobs(reference, batch, average)
    logp = answer_logprobs(policy, batch, average)
    half = logp.shape[0] // 2
    loss, chosen, rejected = dpo_loss(logp[:half], logp[half:], ref[:half], ref[half:], d.beta, d.label_smoothing,
                                      d.loss_type)
    return loss, chosen, rejected, logp.detach()


def run(cfg: RunConfig, ctx: StageContext) -> dict:
    s = cfg.stage.dpo
    out = cfg.stage_dir("dpo")
    tokenizer = ctx.tokenizer
    logger = MetricsLogger(out, "dpo", ctx.is_main, cfg.run.log_interval)

    # ---- data: the rm slice's preference pairs
    data = load_stage_data(cfg, "dpo", tokenizer)
    if ctx.is_main:
        print(data.summary("dpo"), flush=True)
    collate = partial(collate_preferences, pad_id=tokenizer.pad_token_id)

    # ---- the policy (trained) and its frozen reference, both from the same start
    def start_model():
        return load_causal_lm(ctx.inputs["actor"], tokenizer, cfg.dtype, cfg.model.dropout, cfg.model.trust_remote_code)

    with zero3_construction(cfg, s.strategy):
        model = start_model()
    engine, n_steps, per_epoch, tp = engine_and_budget(cfg, model, s, "stage.dpo", len(data.train))
    reference = inference_engine(cfg, start_model, s.strategy, s.offloads_reference())

    def evaluate() -> dict[str, float]:
        """Held-out means of EVAL_KEYS over every rank's pairs, with Wilson 95% intervals of both accuracies."""
        engine.eval()
        sums = dict.fromkeys(EVAL_KEYS, 0.0)
        pairs = 0
        with torch.no_grad():
            for batch in eval_batches(data.eval, s.per_device_eval_batch_size, collate, tp):
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                loss, chosen, rejected, logp = pair_step(engine, reference, batch, s)
                n = len(chosen)
                sums["loss"] += float(loss) * n
                sums["chosen_reward"] += float(chosen.sum())
                sums["rejected_reward"] += float(rejected.sum())
                sums["margin"] += float((chosen - rejected).sum())
                sums["accuracy"] += float(preference_accuracy(chosen, rejected)) * n
                sums["policy_accuracy"] += float(preference_accuracy(logp[:n], logp[n:])) * n
                pairs += n
        engine.train()
        result = dict(zip(EVAL_KEYS, all_reduce_mean([v / max(pairs, 1) for v in sums.values()], pairs)))
        total = len(data.eval)
        for key in ("accuracy", "policy_accuracy"):
            result[f"{key}_low"], result[f"{key}_high"] = wilson_interval(result[key] * total, total)
        return result

    # ---- resume (or evaluate the start)
    checkpointer, step, before = resume_or_evaluate(cfg, ctx, "dpo", s, logger, {"actor": engine}, evaluate)

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
            loss, chosen, rejected, _ = pair_step(engine, reference, batch, s)
            if not guard.ok(loss, f"dpo step {step}"):
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            if micro % s.gradient_accumulation_steps:
                continue
            step += 1
            logger.log(step, "train", loss=float(loss.detach()), chosen_reward=float(chosen.mean()),
                       rejected_reward=float(rejected.mean()), margin=float((chosen - rejected).mean()),
                       accuracy=float(preference_accuracy(chosen, rejected)), lr=engine.get_lr()[0], epoch=epoch)
            if s.eval_interval and step % s.eval_interval == 0:
                logger.log(step, "eval", **evaluate())
            if checkpointer.due(step) or stop_requested():
                checkpointer.save(step, {"actor": engine}, {"epoch": epoch, "eval_before": before})
                stop_requested(exit_if_set=True)
            if step >= n_steps:
                break
        epoch += 1

    # ---- evaluate and write
    after = evaluate()
    logger.log(step, "eval", **after)
    save_hf(engine, out / "final", tokenizer)
    result = {"steps": step, "eval_pairs": len(data.eval), "skipped_steps": guard.skipped}
    for when, numbers in (("before", before), ("after", after)):
        result.update({f"{key}_{when}": value for key, value in numbers.items()})  # accuracy_low_after, ...
    return result

"""Step 3: RLHF with PPO. The actor starts from sft/final (or model.actor when SFT is not part of the
run), the critic and the frozen reward model from rm/final (or model.reward: a reward-model folder),
the frozen reference is a copy of the starting actor. A critic-free estimator (stage.ppo.advantage_estimator
grpo, rloo, reinforce_pp) builds no critic; a reward function (stage.ppo.reward) loads no reward model,
and then the actor's greedy accuracy on held-out prompts is measured before and after training.

Each step: generate answers for `generation_batches` prompt batches, score them (actor and
reference log-probs, critic values, reward), then `ppo_epochs` passes of PPO updates over
minibatches of `per_device_training_batch_size`; after each update an optional PTX step
(data_blend.ptx_path set and unsup_coef > 0) and the EMA update (enable_ema, beta ema_beta).

Reads: sft/final or model.actor, rm/final or model.reward, data_blend (the ppo slice; ptx_path for mixed training), stage.ppo.
Writes: ppo/final/{actor,critic,actor_ema} (Hugging Face format; no critic without one), ppo/metrics.jsonl,
ppo/checkpoints/, ppo/heldout.json (held-out accuracy, with a reward function).
"""

from __future__ import annotations

import json
import time
from functools import partial

from pipeline.checkpoint import Checkpointer
from pipeline.config import RunConfig
from pipeline.data import DataError, load_ptx_data, load_stage_data
from pipeline.data.collate import collate_prompts, collate_text
from pipeline.dist import all_reduce_mean, dp_world_size, world_size
from pipeline.engine import tp_degree
from pipeline.export import save_hf
from pipeline.files import write_json_atomic
from pipeline.resume import resume_stage, stop_requested
from pipeline.rl_math import difference_interval, wilson_interval
from pipeline.rlhf import PPOTrainer, RLHFEngine, ptx_enabled
from pipeline.tracking import MetricsLogger
from pipeline.training import StageContext, epoch_batches, total_steps
from pipeline.truth import GoldCheck

# Held-out accuracy is measured with greedy answers and with answers sampled as in training.
MODES = ("greedy", "sampled")
STAT_KEYS = ("reward", "kl", "entropy", "clip_frac", "approx_kl", "value_error", "answer_length")


def endless_batches(data, micro_batch: int, collate, seed: int, start: int = 0, tp: int = 1):
    """Micro-batches of `data` epoch after epoch (a new seeded shuffle each), from batch `start` on:
    the PTX stream, resumable from the number of batches already used (tp: the actor's
    tensor-parallel degree, whose groups share their batches)."""
    per_epoch = len(data) // (micro_batch * dp_world_size(tp))
    if per_epoch == 0:
        replicas = f"{dp_world_size(tp)} ranks" + (f" (data-parallel: tensor-parallel degree {tp})" if tp > 1 else "")
        raise DataError(f"data_blend.ptx_path: {len(data)} text blocks are fewer than one PTX batch of "
                        f"{micro_batch} x {replicas}; give more text or lower stage.ppo.per_device_training_batch_size")
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from epoch_batches(data, micro_batch, collate, seed, epoch, skip, tp)
        epoch, skip = epoch + 1, 0


def throughput_line(step: int, n_steps: int, c: dict, step_s: float, training_s: float, samples: int, seq_len: int) -> str:
    """DeepSpeed-Chat's three throughput lines in one; TFLOPs count the four experience forwards too."""
    tera = 1e12
    total = c.get("generation_flops", 0) + c.get("experience_flops", 0) + c.get("training_flops", 0)
    gen_s, exp_s = c.get("generation_s", 0.0), c.get("experience_s", 0.0)
    per_token_ms = 1e3 * gen_s / max(c.get("generated_positions", 0) / max(c.get("sequences", 1), 1), 1)
    return (f"[ppo] step {step}/{n_steps} | End-to-End {step_s:.3f} s, {total / tera / step_s:.4g} TFLOPs, "
            f"{samples / step_s:.3g} samples/s, seq length {seq_len} | Generation {gen_s:.3f} s "
            f"({100 * gen_s / step_s:.0f}%), {per_token_ms:.2f} ms/token, "
            f"{c.get('generation_flops', 0) / tera / max(gen_s, 1e-9):.4g} TFLOPs | Experience forwards {exp_s:.3f} s, "
            f"{c.get('experience_flops', 0) / tera / max(exp_s, 1e-9):.4g} TFLOPs | Training {training_s:.3f} s, "
            f"{c.get('training_flops', 0) / tera / max(training_s, 1e-9):.4g} TFLOPs")


def run(cfg: RunConfig, ctx: StageContext) -> dict:
    p = cfg.stage.ppo
    out = cfg.stage_dir("ppo")
    tokenizer = ctx.tokenizer
    logger = MetricsLogger(out, "ppo", ctx.is_main, cfg.run.log_interval)

    # ---- data: prompts, and text for the mixed (PTX) loss
    data = load_stage_data(cfg, "ppo", tokenizer)
    if ctx.is_main:
        print(data.summary("ppo"), flush=True)
    prompts_of = partial(collate_prompts, pad_id=tokenizer.pad_token_id)
    ptx = load_ptx_data(cfg, tokenizer, cfg.data_blend.max_prompt_len + cfg.data_blend.max_answer_len) \
        if ptx_enabled(cfg) else None
    collate_ptx = partial(collate_text, pad_id=tokenizer.pad_token_id)

    # ---- the models (actor and reference; critic and reward model when used)
    prompts_per_step = p.per_device_generation_batch_size * p.generation_batches
    tp = tp_degree(p.actor.strategy)  # the four models share it; a group's ranks share their prompts
    n_steps = total_steps(len(data.train), p.per_device_generation_batch_size, p.generation_batches,
                          p.num_train_epochs, p.max_steps, "stage.ppo", tp)
    per_epoch = len(data.train) // (prompts_per_step * dp_world_size(tp))
    minibatches_per_step = p.ppo_epochs * (p.rows_per_generation_batch * p.generation_batches // p.per_device_training_batch_size)
    updates_per_step = minibatches_per_step * (2 if ptx is not None else 1)  # actor optimizer steps (PTX has its own)
    engine = RLHFEngine(actor_model_name_or_path=ctx.inputs["actor"], critic_model_name_or_path=ctx.inputs.get("reward"),
                        tokenizer=tokenizer, num_total_iters=n_steps * updates_per_step, args=cfg)
    trainer = PPOTrainer(engine=engine, args=cfg)
    stat_keys = [k for k in STAT_KEYS if k != "value_error" or engine.critic is not None]

    # ---- resume
    checkpointer = Checkpointer(out, p.checkpoint.every_steps, p.checkpoint.every_minutes, p.checkpoint.keep,
                                ctx.config)
    engines = {"actor": engine.actor, **({"critic": engine.critic} if engine.critic is not None else {})}
    rank_states = {"actor_ema": engine.ema} if engine.ema is not None else {}
    state = resume_stage(cfg, checkpointer, "ppo", logger, engines, rank_states)
    step = state["step"]
    gold = GoldCheck(cfg, tokenizer, out)  # stage.ppo.gold_check: ground truth on held-out questions
    if step:
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
        trainer.reward_moments.load_state_dict(state["reward_moments"])
        gold.load_state_dict(state.get("gold_check") or gold.state_dict())

    # ---- held-out accuracy of the start (a reward function checks greedy and sampled answers); a
    # resumed run reads it from heldout.json
    n_eval = min(p.eval_prompts, len(data.eval)) if not p.reward_model else 0
    size = p.per_device_generation_batch_size
    eval_batches = [prompts_of(data.eval.rows(range(i, min(i + size, n_eval)))) for i in range(0, n_eval, size)]
    heldout_path, heldout = out / "heldout.json", {}
    if eval_batches and step == 0:
        heldout = {f"{mode}_before": trainer.heldout_accuracy(eval_batches, greedy=mode == "greedy") for mode in MODES}
        if ctx.is_main:
            write_json_atomic(heldout_path, heldout_report(heldout))
    elif eval_batches and heldout_path.exists():
        heldout = {key: tuple(value[:2]) for key, value in json.loads(heldout_path.read_text()).items()
                   if key.endswith("_before")}

    # ---- train
    logger.begin(n_steps, step)
    ptx_batches = endless_batches(ptx, p.per_device_training_batch_size, collate_ptx, cfg.run.seed + 1,
                                  start=step * minibatches_per_step, tp=tp) if ptx is not None else None
    epoch = step // per_epoch
    # A step's span ends where the previous one's did, so steps tile the loop: what is not generation,
    # experience or training (batching prompts, the KL controller, the previous step's logging and
    # checkpoint) is other_s, and the four add up to step_s.
    if gold.due(step):
        gold.check(step, engine.actor, logger)
    t_mark = time.perf_counter()
    while step < n_steps:
        skip = (step - epoch * per_epoch) * p.generation_batches
        prompt_batches = epoch_batches(data.train, p.per_device_generation_batch_size, prompts_of, cfg.run.seed, epoch,
                                       skip, tp)
        for group in zip(*[prompt_batches] * p.generation_batches):  # whole groups only: a short last one is dropped
            experiences = [trainer.generate_experience(batch) for batch in group]
            t_train = time.perf_counter()
            stats, losses, ptx_losses = [], [], []
            for _ in range(p.ppo_epochs):
                for exp in experiences:
                    for mb in exp.minibatches(p.per_device_training_batch_size):
                        a_loss, c_loss = trainer.train_rlhf(mb)
                        ptx_batch = next(ptx_batches) if ptx_batches is not None else None  # drawn even when skipped
                        if trainer.last_stats is None:  # skipped: a non-finite loss
                            continue
                        stats.append(trainer.last_stats)
                        losses.append((float(a_loss), float(c_loss)))
                        if ptx_batch is not None:
                            ptx_losses.append(float(trainer.train_unsupervised(ptx_batch)))
                        trainer.update_ema()
            training_s = time.perf_counter() - t_train
            step += 1
            mean = {k: sum(s[k] for s in stats) / max(len(stats), 1) for k in stat_keys}
            trainer.update_kl_controller(all_reduce_mean([mean["kl"]], len(stats))[0], prompts_per_step * dp_world_size(tp))
            counters = trainer.pop_counters()
            now = time.perf_counter()
            step_s, t_mark = now - t_mark, now
            generation_s, experience_s = counters.get("generation_s", 0.0), counters.get("experience_s", 0.0)
            samples = prompts_per_step * dp_world_size(tp)
            flops = counters.get("generation_flops", 0) + counters.get("experience_flops", 0) + counters.get("training_flops", 0)
            extra = {"ptx_loss": sum(ptx_losses) / len(ptx_losses)} if ptx_losses else {}
            logger.log(step, "train", **mean,
                       actor_loss=sum(a for a, _ in losses) / max(len(losses), 1),
                       **({"critic_loss": sum(c for _, c in losses) / max(len(losses), 1)} if engine.critic is not None else {}),
                       kl_coef=trainer.kl_ctl.value, **extra,
                       generation_s=generation_s, experience_s=experience_s, training_s=training_s,
                       other_s=step_s - generation_s - experience_s - training_s, step_s=step_s,
                       samples_per_s=samples / step_s, tflops=flops * world_size() / 1e12 / step_s)
            if ctx.is_main and step % cfg.run.log_interval == 0:
                print(throughput_line(step, n_steps, counters, step_s, training_s, samples,
                                      experiences[0].seq.shape[1]), flush=True)
            if gold.due(step):
                gold.check(step, engine.actor, logger)
                n_steps = step if gold.should_stop() else n_steps  # early stop: the gold check kept falling
            if checkpointer.due(step) or stop_requested():
                checkpointer.save(step, engines, {"epoch": epoch, "kl_ctl": trainer.kl_ctl.state_dict(),
                                                  "reward_moments": trainer.reward_moments.state_dict(),
                                                  "gold_check": gold.state_dict()}, rank_states)
                stop_requested(exit_if_set=True)
            if step >= n_steps:
                break
        epoch += 1

    if gold.due(step, last=True):
        gold.check(step, engine.actor, logger)

    # ---- write
    save_hf(engine.actor, out / "final" / "actor", tokenizer)
    if engine.critic is not None:
        save_hf(engine.critic, out / "final" / "critic", tokenizer)
    if engine.ema is not None:
        engine.ema.save(out / "final" / "actor_ema", tokenizer)
    result = {**summarize(logger.path, step, trainer.guard.skipped), **gold.finish(out / "final" / "actor", step, ctx.is_main)}
    if eval_batches:
        heldout.update({f"{mode}_after": trainer.heldout_accuracy(eval_batches, greedy=mode == "greedy") for mode in MODES})
        report = heldout_report(heldout)
        if ctx.is_main:
            write_json_atomic(heldout_path, report)
            print(f"[ppo] held-out accuracy ({n_eval} prompts, stage.ppo.reward={p.reward}): "
                  + ", ".join(f"{key} {r}/{n} = {r / n:.3f} [{lo:.3f}, {hi:.3f}]" for key, (r, n, lo, hi) in
                              ((key, value) for key, value in report.items() if not key.endswith("_gain"))), flush=True)
        for key, value in report.items():
            if key.endswith("_gain"):
                result[f"heldout_{key}"], result[f"heldout_{key}_ci95"] = value[0], value[1:]
            else:
                right, n, low, high = value
                result[f"heldout_{key}"], result[f"heldout_{key}_ci95"] = right / n, [low, high]
        if ctx.is_main and "heldout_sampled_gain" in result:
            print("[ppo] held-out gain (after - before, 95% interval): " + ", ".join(
                f"{mode} {result[f'heldout_{mode}_gain']:+.3f} [{result[f'heldout_{mode}_gain_ci95'][0]:+.3f}, "
                f"{result[f'heldout_{mode}_gain_ci95'][1]:+.3f}]" for mode in MODES), flush=True)
        result["heldout_prompts"] = n_eval
    return result


def heldout_report(heldout: dict[str, tuple[int, int]]) -> dict[str, list]:
    """{"greedy_before", ...: [right, answered, 95% low, 95% high]} (Wilson interval), and once both ends
    are measured {"greedy_gain", "sampled_gain": [after - before, 95% low, 95% high]}: Newcombe's interval
    for two independent proportions, conservative here, where both answer the same prompts."""
    report = {when: [right, n, *wilson_interval(right, n)] for when, (right, n) in heldout.items()}
    for mode in MODES:
        if f"{mode}_before" in heldout and f"{mode}_after" in heldout:
            (r0, n0), (r1, n1) = heldout[f"{mode}_before"], heldout[f"{mode}_after"]
            report[f"{mode}_gain"] = [r1 / n1 - r0 / n0, *difference_interval(r0, n0, r1, n1)]
    return report


def summarize(metrics_path, steps: int, skipped: int) -> dict:
    """Mean reward over the first and the last fifth of the steps (at least 3), and the last KL/length."""
    from pipeline.tracking import read_metrics

    rows = [r for r in read_metrics(metrics_path) if r["split"] == "train"]
    k = max(3, len(rows) // 5)
    first, last = rows[:k], rows[-k:]

    def avg(part, key):
        return sum(r[key] for r in part) / max(len(part), 1)

    return {"steps": steps, "reward_first": avg(first, "reward"), "reward_last": avg(last, "reward"),
            "kl_last": avg(last, "kl"), "answer_length_last": avg(last, "answer_length"), "skipped_steps": skipped}

"""The runner: stages in order, each skipped when its manifest says it finished with the same
config, else run (resuming from its last checkpoint when there is one)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipeline.checkpoint import ConfigRecord, read_manifest, write_manifest
from pipeline.config import TRAINED_ROLES, ConfigError, RunConfig, at, finalize
from pipeline.dist import barrier, init_distributed, rank
from pipeline.files import atomic_write, write_json_atomic
from pipeline.models import ensure_available, load_tokenizer, materialize
from pipeline.planner import plan_run
from pipeline.resume import install_signal_handlers
from pipeline.tracking import finish_loggers
from pipeline.training import StageContext

# What shapes each stage's result; a stage's hash also covers the stages it reads from.
STAGE_KEYS = {
    "sft": ["model.actor", "model.tokenizer", "model.dropout", "data_blend", "stage.sft", "run.seed", "run.dtype"],
    "rm": ["model.reward", "model.tokenizer", "model.dropout", "data_blend", "stage.rm", "run.seed", "run.dtype"],
    "ppo": ["model", "data_blend", "stage.ppo", "run.seed", "run.dtype"],
    "dpo": ["model.actor", "model.tokenizer", "model.dropout", "data_blend", "stage.dpo", "run.seed", "run.dtype"],
}
# The models a stage starts from: each is the final model of an earlier stage of this run when that
# stage is in run.stages or finished with its current config, else the model the config names (a
# checkpoint given from outside: DeepSpeed-Chat's --actor_model_name_or_path and friends).
STAGE_INPUTS = {"sft": {}, "rm": {}, "ppo": {"actor": ("sft", "model.actor"), "reward": ("rm", "model.reward")},
                "dpo": {"actor": ("sft", "model.actor")}}
# Settings only PPO reads (mixed training) must not re-run SFT and RM.
PPO_ONLY = ("data_blend.ptx_path", "data_blend.ptx_field", "data_blend.ptx_max_blocks")
# Where the frozen models' weights live changes no number PPO or DPO computes: switching it (say, after
# an out-of-memory error) resumes the stage instead of starting it over.
FROZEN_LAYOUT = ("stage.ppo.offload_reference_model", "stage.ppo.offload_reward_model", "stage.dpo.offload_reference_model")
# The tensor-parallel degree is left out too, as the number of ranks is (both set the data-parallel
# width): a finished stage is not redone for it, and a stopped one keeps its checkpoints for the resume,
# which refuses another degree by key (pipeline.resume) instead of starting over.
FROZEN_LAYOUT += tuple(f"{key}.strategy.tp_degree" for _, _, key in TRAINED_ROLES)


@dataclass(frozen=True)
class StageInput:
    """Where one model a stage starts from comes from."""

    path: str  # a folder, or a hub id for a given model
    stage: str | None  # the stage of this run that wrote it; None when the config names it
    key: str  # the config key naming it when given (model.actor, model.reward)

    def describe(self) -> str:
        return f"{self.stage}/final of this run" if self.stage else f"{self.key}={self.path} (given)"


def stage_inputs(cfg: RunConfig, stage: str) -> dict[str, StageInput]:
    """The models `stage` starts from (see STAGE_INPUTS)."""
    out = {}
    for name, (upstream, key) in STAGE_INPUTS[stage].items():
        if (stage, name) == ("ppo", "reward") and not (cfg.stage.ppo.needs_critic or cfg.stage.ppo.reward_model):
            continue  # a reward function and no critic: nothing starts from a reward model
        final = cfg.stage_dir(upstream) / "final"
        manifest = read_manifest(cfg.stage_dir(upstream))
        done = bool(manifest) and manifest.get("config_hash") == stage_hash(cfg, upstream) and final.exists()
        if upstream in cfg.run.stages or done:
            out[name] = StageInput(str(final), upstream, key)
        else:
            out[name] = StageInput(at(cfg, key + "_source"), None, key)
    return out


def stage_hash(cfg: RunConfig, stage: str) -> str:
    """What shapes a stage's result: its config sections, and each model it starts from (an earlier
    stage's hash, or a given checkpoint's files)."""
    own = cfg.section_hash(*STAGE_KEYS[stage], exclude=FROZEN_LAYOUT + (() if stage == "ppo" else PPO_ONLY))
    parts = [own]
    for source in stage_inputs(cfg, stage).values():
        parts.append(stage_hash(cfg, source.stage)[:8] if source.stage else _fingerprint(source.path))
    return "-".join(parts)


def stage_record(cfg: RunConfig, stage: str) -> ConfigRecord:
    """What a stage's checkpoints record: its hash and every setting behind it (its own sections, those
    of the stages of this run it reads from, and the identity of the models it starts from), so that a
    resume under another config names the key that changed."""
    sections = cfg.sections(*STAGE_KEYS[stage], exclude=FROZEN_LAYOUT + (() if stage == "ppo" else PPO_ONLY))
    inputs = {}
    for name, source in stage_inputs(cfg, stage).items():
        if source.stage:
            sections = {**stage_record(cfg, source.stage).sections, **sections}
            inputs[name] = f"{source.stage}:{stage_hash(cfg, source.stage)}"
        else:
            inputs[name] = f"{source.key}={source.path}:{_fingerprint(source.path)}"
    return ConfigRecord(stage_hash(cfg, stage), {**sections, "inputs": inputs} if inputs else sections)


def _fingerprint(source: str) -> str:
    """A given model's identity: its files' names, sizes and times (a hub id: the id itself)."""
    path = Path(source)
    if not path.is_dir():
        return hashlib.sha256(source.encode()).hexdigest()[:8]
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([str(path.resolve()), files]).encode()).hexdigest()[:8]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_stage_dir(cfg: RunConfig, stage: str, config_hash: str) -> None:
    """Checkpoints and metrics made under another config are removed before the stage runs."""
    stage_dir = cfg.stage_dir(stage)
    marker = stage_dir / "config_hash"
    if marker.exists() and marker.read_text().strip() != config_hash:
        for stale in ("checkpoints", "metrics.jsonl", "final", "manifest.json"):
            path = stage_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, config_hash)


def check_output_dir(path: Path) -> None:
    """Before anything is written: run.output_dir is, or can become, a folder this process writes to."""
    path = path.expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.output_dir={path}: {existing} is a file, not a folder; choose another run.output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable by this user (permission denied)"
        raise ConfigError(f"run.output_dir={path}: {existing} {why}; choose another run.output_dir")


def quiet_libraries() -> None:
    """Our own lines say what happens; the libraries' per-file progress bars and notices do not."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "compilers.C.base", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_sources(cfg: RunConfig) -> None:
    """Before anything is printed or written: every hub model the stages will load is reachable."""
    ensure_available(cfg.tokenizer_source, "model.tokenizer")
    if "sft" in cfg.run.stages:
        ensure_available(cfg.model.actor_source, "model.actor")
    if "rm" in cfg.run.stages:
        ensure_available(cfg.model.reward_source, "model.reward")
    for stage in cfg.run.stages:
        for source in stage_inputs(cfg, stage).values():
            if source.stage is None:
                ensure_available(source.path, source.key)


def run_pipeline(cfg: RunConfig) -> dict[str, dict]:
    """Run cfg.run.stages; return {stage: result numbers}."""
    install_signal_handlers()
    quiet_libraries()
    check_output_dir(cfg.output_dir)
    check_sources(cfg)
    out = cfg.output_dir
    plan = plan_run(cfg)
    cfg = finalize(cfg, plan)  # the plan fills what the user left null; validated again, then frozen
    init_distributed(cfg)
    is_main = rank() == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        plan.save(out)
        print(plan.table(), flush=True)
        for warning in plan.warnings:
            print(f"warning: {warning}", flush=True)
    barrier()
    tokenizer = load_tokenizer(cfg.tokenizer_source, out, cfg.model.trust_remote_code)

    results: dict[str, dict] = {}
    for stage in cfg.run.stages:
        config_hash = stage_hash(cfg, stage)
        manifest = read_manifest(cfg.stage_dir(stage))
        if manifest and manifest.get("config_hash") == config_hash and (cfg.stage_dir(stage) / "final").exists():
            if is_main:
                print(f"[{stage}] already done with this config: skipping (results in {cfg.stage_dir(stage)})", flush=True)
            results[stage] = manifest["result"]
            continue
        if manifest and is_main:
            print(f"[{stage}] config changed since it finished: running {stage} again, and the stages after it", flush=True)
        inputs = stage_inputs(cfg, stage)
        if is_main:
            _prepare_stage_dir(cfg, stage, config_hash)
            write_json_atomic(cfg.stage_dir(stage) / "inputs.json", {k: dataclasses.asdict(v) for k, v in inputs.items()})
            for name, source in inputs.items():
                print(f"[{stage}] {name} from {source.describe()}", flush=True)
        barrier()
        seed_everything(cfg.run.seed)
        started = time.time()
        module = importlib.import_module(f"pipeline.stages.{stage}")
        paths = {name: source.path if source.stage else materialize(at(cfg, source.key), out, len(tokenizer), cfg.run.seed)
                 for name, source in inputs.items()}  # a given built-in model is written from its config first
        context = StageContext(tokenizer=tokenizer, work_dir=out, inputs=paths, config=stage_record(cfg, stage))
        result = module.run(cfg, context)
        result["seconds"] = round(time.time() - started, 1)
        barrier()
        if is_main:
            write_manifest(cfg.stage_dir(stage), config_hash, result)
        barrier()  # the next stage reads this manifest on every rank
        results[stage] = result
    if is_main:
        truth = ground_truth(cfg, out)
        write_json_atomic(out / "results.json", {**results, **({"truth": truth} if truth else {})})
        print(summary(cfg, results, truth), flush=True)
        try:  # the report must never fail a finished run
            from pipeline.report import build_report

            print(f"report: {build_report(out)}", flush=True)
        except Exception as err:
            print(f"warning: report.md not written ({type(err).__name__}: {err}); "
                  f"retry with: python -m pipeline.report {out}", flush=True)
    finish_loggers()  # close this run's wandb run / tensorboard writers (a sweep runs many in one process)
    return results


def ground_truth(cfg: RunConfig, out: Path) -> dict | None:
    """The policies' ground truth on the built-in task's held-out questions (pipeline.truth), or None
    when the data has none or no policy was trained. It must never fail a finished run."""
    from pipeline.truth import evaluate_run, run_has_ground_truth

    if not run_has_ground_truth(cfg) or not {"sft", "ppo", "dpo"} & set(cfg.run.stages):
        return None
    try:
        return evaluate_run(out, cfg, device="cuda" if cfg.hardware.device == "cuda" else "cpu")
    except Exception as err:
        print(f"warning: ground truth not measured ({type(err).__name__}: {err}); "
              f"retry with: python -m pipeline.evaluate truth run={out}", flush=True)
        return None


def summary(cfg: RunConfig, results: dict[str, dict], truth: dict | None = None) -> str:
    """The run's closing lines: each stage's numbers, the ground truth (truth: pipeline.truth.evaluate_run)."""
    from pipeline.truth import summary_lines

    lines = ["", f"== run {cfg.output_dir} =="]
    if "sft" in results:
        r = results["sft"]
        lines.append(f"SFT   eval loss {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} "
                     f"(perplexity {r['perplexity_after']:.2f}), {r['steps']} steps, {r.get('seconds', 0):.0f} s")
    if "rm" in results:
        r = results["rm"]
        lines.append(f"RM    held-out accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}, "
                     f"mean score chosen {r['chosen_score']:.3f} / rejected {r['rejected_score']:.3f}, "
                     f"{r['steps']} steps, {r.get('seconds', 0):.0f} s")
    if "ppo" in results:
        r = results["ppo"]
        lines.append(f"PPO   mean reward {r['reward_first']:.3f} (first steps) -> {r['reward_last']:.3f} (last steps), "
                     f"KL {r['kl_last']:.4f}, answer length {r['answer_length_last']:.1f}, {r['steps']} steps, "
                     f"{r.get('seconds', 0):.0f} s")
    if "ppo" in results and "heldout_greedy_gain" in results["ppo"]:
        r = results["ppo"]
        lines.append(f"PPO   held-out accuracy ({r['heldout_prompts']} prompts, {cfg.stage.ppo.reward}): " + ", ".join(
            f"{mode} {r[f'heldout_{mode}_before']:.3f} -> {r[f'heldout_{mode}_after']:.3f} "
            f"(gain {r[f'heldout_{mode}_gain']:+.3f}, 95% interval {r[f'heldout_{mode}_gain_ci95'][0]:+.3f} to "
            f"{r[f'heldout_{mode}_gain_ci95'][1]:+.3f})" for mode in ("greedy", "sampled")))
    if "dpo" in results:
        r = results["dpo"]
        lines.append(f"DPO   held-out preference accuracy {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} "
                     f"(95% interval {r['accuracy_low_after']:.3f}-{r['accuracy_high_after']:.3f}, {r['eval_pairs']} pairs), "
                     f"reward margin {r['margin_before']:.3f} -> {r['margin_after']:.3f}, loss {r['loss_before']:.3f} -> "
                     f"{r['loss_after']:.3f}, {r['steps']} steps, {r.get('seconds', 0):.0f} s")
    if "ppo" in results and results["ppo"].get("gold_best") is not None:
        r = results["ppo"]
        lines.append(f"PPO   gold check (greedy accuracy on held-out validation questions): best {r['gold_best']:.3f} at step {r['gold_best_step']}, "
                     f"last {r['gold_last']:.3f} at step {r['gold_last_step']}"
                     f"{', stopped early' if r.get('gold_stopped_early') else ''}; final/actor is step {r['final_step']}")
    lines += summary_lines(truth or {})
    for stage in results:
        lines.append(f"{stage.upper():5} model: {cfg.stage_dir(stage) / 'final'}")
    return "\n".join(lines)

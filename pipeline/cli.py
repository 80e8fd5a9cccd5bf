"""From a composed Hydra config to a finished run, turning known failures into one-line errors.

Where the processes come from (launchers/):
- no deployment / single_gpu: this process runs the stages;
- single_node / multi_node (torchrun, deepspeed): not yet a rank -> the same command again under
  the launcher, every rank runs the same stages (only rank 0 writes manifests, reports, models);
- inside a SLURM job step: torch.distributed from SLURM's variables; a pre-empted run requeues.
- Hydra multirun (-m): each job runs in its own folder, hydra.sweep.dir/hydra.sweep.subdir.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.launchers.distributed import child_overrides, needs_relaunch, relaunch_command, run_relaunch
from pipeline.launchers.slurm import export_torch_env, register_resolvers as register_launcher_resolvers, \
    requeue_after_preemption
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.errors import RESUMABLE_EXIT_CODE
from pipeline.runner import fail, run_pipeline

register_launcher_resolvers()  # conf/hydra/launcher/slurm.yaml resolves ${slurm_tasks_per_node:...}


def resolve_hardware(composed: DictConfig) -> DictConfig:
    """hardware=auto becomes the detected device's facts."""
    if composed.get("hardware", {}).get("name") == "auto":
        from pipeline.hardware import detect_hardware

        with open_dict(composed):
            composed.hardware = OmegaConf.merge(composed.hardware, detect_hardware())
    return composed


def hydra_job() -> tuple[list[str], str | None, bool]:
    """(this job's command-line overrides, Hydra's output folder for it, whether in a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return [], None, False
    hc = HydraConfig.get()
    return list(hc.overrides.task), hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN


def execute(composed: DictConfig) -> dict | None:
    try:
        composed = resolve_hardware(composed)
        overrides, hydra_dir, multirun = hydra_job()
        if multirun and hydra_dir:
            # One folder per sweep job (<hydra.sweep.dir>/<hydra.sweep.subdir>), so jobs never share
            # checkpoints, and a requeued job finds its own.
            with open_dict(composed):
                composed.run.output_dir = hydra_dir
        cfg = load_config(composed)
        if cfg.run.dry_run:
            from pipeline.planner import dry_run_report

            print(dry_run_report(cfg), flush=True)
            return None
        export_torch_env(cfg)  # inside a SLURM job step: RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM
        if needs_relaunch(cfg):
            run_dir = str(cfg.output_dir.expanduser().resolve())
            code = run_relaunch(relaunch_command(cfg, child_overrides(overrides, run_dir, None if multirun else hydra_dir)))
            if code == RESUMABLE_EXIT_CODE:
                requeue_after_preemption()
            if code:
                sys.exit(code)
            return None
        try:
            return run_pipeline(cfg)
        except SystemExit as stop:
            if stop.code == RESUMABLE_EXIT_CODE:
                requeue_after_preemption()
            raise
    except UserError as err:
        fail(str(err))
    return None

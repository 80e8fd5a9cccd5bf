"""SLURM: torch.distributed from SLURM's variables inside a job step, requeue after pre-emption,
and the resolvers the Hydra launcher config (conf/hydra/launcher/slurm.yaml) uses.

Pre-emption, end to end:
  1. sbatch gets `--signal=USR1@<signal_delay_s>` (and `--requeue`): SLURM sends SIGUSR1 to every
     task that long before the time limit; a pre-empting scheduler sends SIGTERM.
  2. pipeline/resume.py turns either signal into "save a checkpoint at the next step, exit 75".
  3. `requeue_after_preemption` (called by pipeline/cli.py on exit code 75, on global rank 0
     only) runs `scontrol requeue $SLURM_JOB_ID` unless the job is being cancelled.
  4. SLURM starts the same batch script again; submitit re-runs the same pickled Hydra job (same
     overrides, same run folder), and `run.resume=auto` continues from that checkpoint.
  We requeue ourselves rather than through submitit's checkpoint hook because submitit's handler
  (SIGUSR2) requeues immediately, from inside the signal handler, without a training checkpoint;
  ours requeues after the stage has written one, and works the same under a plain sbatch + srun.
"""

from __future__ import annotations

import os
import subprocess
import sys

from omegaconf import OmegaConf

from pipeline.config import ConfigError, RunConfig
from pipeline.launchers.process_env import (
    RELAUNCHED_ENV,
    in_job_step,
    inside_launcher,
    job_nodes,
    rendezvous_port,
    step_tasks,
    tasks_on_this_node,
)

MAX_REQUEUES_ENV = "PIPELINE_MAX_REQUEUES"
DEFAULT_MAX_REQUEUES = 20


def torch_env_from_slurm(cfg: RunConfig, env: os._Environ | dict = os.environ) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this SLURM task; {} when SLURM does
    not start the ranks (no job step, or torchrun started by one task per node)."""
    if not in_job_step(env):
        if cfg.deployment.launcher == "slurm":
            raise ConfigError("deployment.launcher=slurm: this process is not a SLURM job step; submit it with "
                              "`python -m pipeline -m hydra/launcher=slurm ...` or start it with srun")
        return {}
    ntasks = step_tasks(env)
    if cfg.deployment.launcher == "deepspeed" and ntasks > 1:
        raise ConfigError(f"deployment.launcher=deepspeed in a SLURM job step of {ntasks} tasks: each task would start "
                          "the DeepSpeed launcher on every host of the hostfile; on SLURM use deployment.launcher=slurm "
                          "(SLURM starts every rank) or torchrun (one task per node)")
    if cfg.deployment.launcher in ("torchrun", "deepspeed") or (cfg.deployment.launcher != "slurm" and ntasks == 1):
        return {}  # one task per node: torchrun (or, alone, the DeepSpeed launcher) starts the ranks
    nodes = job_nodes(env)
    dep = cfg.deployment
    master = dep.master_addr
    if master in ("127.0.0.1", "localhost"):
        master = "127.0.0.1" if len(nodes) <= 1 else nodes[0]
    port = dep.master_port or rendezvous_port(env)
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(ntasks),
        "LOCAL_WORLD_SIZE": str(tasks_on_this_node(env)),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
    }


def export_torch_env(cfg: RunConfig) -> dict[str, str]:
    """Export torch_env_from_slurm into os.environ (unless a launcher already set RANK)."""
    if inside_launcher():
        return {}
    values = torch_env_from_slurm(cfg)
    os.environ.update(values)
    return values


def job_state(job_id: str) -> str:
    try:
        return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def requeue_after_preemption(env: os._Environ | dict = os.environ) -> bool:
    """After a resumable exit (code 75) in a SLURM job: requeue it, once, from global rank 0.

    Not requeued: outside SLURM, on other ranks, in ranks a relaunching parent started (the parent
    requeues), a job being cancelled (scancel), or after PIPELINE_MAX_REQUEUES restarts."""
    job = env.get("SLURM_JOB_ID")
    if not job or env.get(RELAUNCHED_ENV) or env.get("SLURM_PROCID", "0") != "0":
        return False
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    limit = int(env.get(MAX_REQUEUES_ENV) or DEFAULT_MAX_REQUEUES)
    if restarts >= limit:
        print(f"SLURM job {job}: not requeued, it already restarted {restarts} times ({MAX_REQUEUES_ENV}={limit})",
              file=sys.stderr, flush=True)
        return False
    state = job_state(job)
    if state.startswith("CANCEL"):
        print(f"SLURM job {job} is {state}: not requeued", file=sys.stderr, flush=True)
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"SLURM job {job}: scontrol requeue failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
        return False
    print(f"SLURM job {job}: checkpoint saved, requeued (restart {restarts + 1}); it resumes from the checkpoint",
          file=sys.stderr, flush=True)
    return True


def tasks_per_node(launcher: str, procs_per_node, gpus_per_node) -> int:
    """SLURM tasks per node: one per rank when SLURM starts the ranks (deployment.launcher=slurm),
    else one (torchrun / the DeepSpeed launcher inside the job starts the ranks)."""
    if launcher != "slurm":
        return 1
    return int(procs_per_node or gpus_per_node or 1)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("slurm_tasks_per_node"):
        OmegaConf.register_new_resolver("slurm_tasks_per_node", tasks_per_node)

"""What this process's environment says about how it was started: by a relaunching parent, by a
launcher (torchrun, DeepSpeed's runner), or by SLURM (job step, node list, task counts, the
rendezvous port every task derives alike).

Read by launchers/distributed.py and launchers/slurm.py alike, which therefore do not import each
other. Standard library only.
"""

from __future__ import annotations

import os
import re
import subprocess

# Set by the parent for its ranks: they must neither relaunch nor requeue.
RELAUNCHED_ENV = "PIPELINE_RELAUNCHED"


def inside_launcher(env: os._Environ | dict = os.environ) -> bool:
    """True in a rank started by torchrun, the DeepSpeed launcher, or with SLURM's variables exported."""
    return "RANK" in env and "WORLD_SIZE" in env


def in_job_step(env: os._Environ | dict = os.environ) -> bool:
    """True in a task started by srun (submitit uses srun); false in the batch script itself."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,7],gpu5` -> ['node01', 'node02', 'node03', 'node7', 'gpu5'] (scontrol when present)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}")
    return hosts


def this_node_rank(env: os._Environ | dict = os.environ) -> str | None:
    """This node's rank in a run of several nodes (NODE_RANK, else SLURM's node id); None when unsaid."""
    return env.get("NODE_RANK", env.get("SLURM_NODEID"))


def job_nodes(env: os._Environ | dict = os.environ) -> list[str]:
    """The hosts of this job step (else of the job), node 0 first; [] outside SLURM."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    return expand_nodelist(nodelist) if nodelist else []


def step_tasks(env: os._Environ | dict = os.environ) -> int:
    """The number of tasks in this job step (1 when SLURM does not say)."""
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


def tasks_on_this_node(env: os._Environ | dict = os.environ) -> int:
    """Tasks of this job step on this node: SLURM_STEP_TASKS_PER_NODE looks like "2" or "2(x3),1"."""
    value = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    return int(value.split(",")[0].split("(")[0])


def rendezvous_port(env: os._Environ | dict = os.environ) -> int | None:
    """The port every task of a SLURM job derives alike from its job id (no task can ask another
    before the rendezvous); None outside SLURM."""
    job = env.get("SLURM_JOB_ID")
    return 20000 + int(job) % 20000 if job else None

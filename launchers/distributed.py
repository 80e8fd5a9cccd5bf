"""Multi-process runs: the same `python -m pipeline ...` command, re-run under torchrun or the
DeepSpeed launcher when `deployment.launcher` asks for one and this process is not a rank yet.

The parent stays alive while the ranks run: it forwards SIGUSR1 / SIGTERM to the ranks (so that
they save a checkpoint at their next step, see pipeline/resume.py) and returns the launcher's
exit code, or RESUMABLE_EXIT_CODE when a stop signal ended the run early.

On several nodes (DeepSpeed launcher + hostfile) the ranks start through pdsh/ssh in a bare login
shell, which carries none of this shell's variables but DeepSpeed's own few (PYTHON*, NCCL_*, ...).
So the parent writes <run>/.launch/node_env.sh (mode 600: it may hold tokens) that puts this
Python's bin folder first on PATH and exports FORWARDED_ENV_PREFIXES, and every node sources it
(DeepSpeed's --venv_script).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from pipeline.config import ConfigError, RunConfig

# Set by the parent for its ranks: they must neither relaunch nor requeue.
RELAUNCHED_ENV = "PIPELINE_RELAUNCHED"
MULTI_PROCESS_LAUNCHERS = ("torchrun", "deepspeed")
# Variables every node must see as the launching shell does: caches and offline switches, tokens,
# logging, thread counts, this project's switches (PIPELINE_PROGRESS, ...).
FORWARDED_ENV_PREFIXES = ("PIPELINE_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "WANDB_", "TORCH_", "PYTORCH_",
                          "GLOO_", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "VIRTUAL_ENV")


def inside_launcher(env: os._Environ | dict = os.environ) -> bool:
    """True in a rank started by torchrun, the DeepSpeed launcher, or with SLURM's variables exported."""
    return "RANK" in env and "WORLD_SIZE" in env


def needs_relaunch(cfg: RunConfig, env: os._Environ | dict = os.environ) -> bool:
    return cfg.deployment.launcher in MULTI_PROCESS_LAUNCHERS and not inside_launcher(env)


def procs_per_node(cfg: RunConfig) -> int:
    """deployment.procs_per_node, else every local GPU (hardware.devices_per_node), else 1 (CPU)."""
    if cfg.deployment.procs_per_node:
        return cfg.deployment.procs_per_node
    return max(1, cfg.hardware.devices_per_node) if cfg.hardware.device == "cuda" else 1


@dataclass
class Relaunch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path -> text, written (mode 600) before launching

    def __str__(self) -> str:
        return shlex.join(self.argv)


def child_overrides(task_overrides: list[str], output_dir: str, hydra_dir: str | None) -> list[str]:
    """The command line the ranks get: the user's overrides (this job's, in a multirun), the run
    folder pinned to the parent's, and no second copy of Hydra's .hydra/ files."""
    pinned = ("run.output_dir=", "+run.output_dir=", "++run.output_dir=")
    out = [o for o in task_overrides if not o.startswith(pinned)]
    out.append(f"run.output_dir={output_dir}")
    if hydra_dir:
        out.append(f"hydra.run.dir={hydra_dir}")
    out.append("hydra.output_subdir=null")
    return out


def node_env_script(env: os._Environ | dict) -> str:
    """The shell lines that give a rank on another node this process's Python and variables."""
    lines = ["# Sourced on every node before its ranks start (written by launchers/distributed.py).",
             f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"",
             f"export {RELAUNCHED_ENV}=1"]
    for name in sorted(env):
        if name.startswith(FORWARDED_ENV_PREFIXES) and name != RELAUNCHED_ENV and name.isidentifier():
            lines.append(f"export {name}={shlex.quote(env[name])}")
    return "\n".join(lines) + "\n"


def relaunch_command(cfg: RunConfig, overrides: list[str], env: os._Environ | dict = os.environ,
                     port: int | None = None) -> Relaunch:
    """The launcher command line that runs `python -m pipeline <overrides>` on every rank."""
    from pipeline.engine import free_port

    dep = cfg.deployment
    nprocs = procs_per_node(cfg)
    port = port or dep.master_port or free_port()
    child_env = {RELAUNCHED_ENV: "1"}
    if dep.launcher == "torchrun":
        if dep.nodes > 1:
            node_rank = env.get("NODE_RANK", env.get("SLURM_NODEID"))
            if node_rank is None or dep.master_addr in ("127.0.0.1", "localhost"):
                raise ConfigError(
                    f"deployment.nodes={dep.nodes} with deployment.launcher=torchrun: run the same command on every node "
                    "with NODE_RANK set and deployment.master_addr=<node 0's address>, or use "
                    "+deployment=multi_node (DeepSpeed launcher + hostfile) or the SLURM launcher")
        else:
            node_rank = "0"
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={dep.nodes}", f"--nproc_per_node={nprocs}",
                f"--node_rank={node_rank}", f"--master_addr={dep.master_addr}", f"--master_port={port}",
                "-m", "pipeline", *overrides]
        return Relaunch(argv, child_env)
    if dep.launcher == "deepspeed":
        argv = [sys.executable, "-m", "deepspeed.launcher.runner"]
        files: dict[str, str] = {}
        if dep.hostfile:
            from launchers.hostfile import HostfileError, read_hostfile

            try:
                hosts = read_hostfile(dep.hostfile)
            except HostfileError as err:
                raise ConfigError(str(err)) from None
            if dep.nodes > len(hosts):
                raise ConfigError(f"deployment.nodes={dep.nodes}: the hostfile {dep.hostfile} lists only "
                                  f"{len(hosts)} host(s)")
            too_few = {h: s for h, s in list(hosts.items())[:dep.nodes] if s < nprocs}
            if too_few:
                raise ConfigError(f"deployment.procs_per_node={nprocs}: hostfile {dep.hostfile} gives fewer slots on {too_few}")
            master = dep.master_addr if dep.master_addr not in ("127.0.0.1", "localhost") else next(iter(hosts))
            script = str(cfg.output_dir.expanduser().resolve() / ".launch" / "node_env.sh")
            files[script] = node_env_script(env)
            argv += ["--hostfile", dep.hostfile, f"--num_nodes={dep.nodes}", f"--master_addr={master}",
                     "--venv_script", shlex.quote(script)]
        elif dep.nodes > 1:
            raise ConfigError(f"deployment.nodes={dep.nodes} with deployment.launcher=deepspeed needs "
                              "deployment.hostfile=<file with one 'host slots=N' line per node>")
        else:
            # No hostfile: DeepSpeed's runner uses this machine only.
            argv += [f"--master_addr={dep.master_addr}"]
        argv += [f"--num_gpus={nprocs}", f"--master_port={port}", "--no_local_rank", "--module", "pipeline", *overrides]
        return Relaunch(argv, child_env, files)
    raise ConfigError(f"deployment.launcher={dep.launcher}: not a multi-process launcher "
                      f"({', '.join(MULTI_PROCESS_LAUNCHERS)})")


def _rank_processes(launcher_pid: int) -> list:
    """The `python -m pipeline` processes under the launcher (not the launcher's own helpers)."""
    import psutil

    ranks = []
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return ranks
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd and cmd.index("-m") + 1 < len(cmd) and cmd[cmd.index("-m") + 1] == "pipeline":
            ranks.append(child)
    return ranks


def _ignore_usr1() -> None:
    # torchrun dies on SIGUSR1 (default action); ignored signals stay ignored across exec, and
    # each rank installs its own handler (pipeline/resume.py), so only the launcher ignores it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_relaunch(relaunch: Relaunch) -> int:
    """Run the launcher, forward stop signals to the ranks, return the exit code to use."""
    from pipeline.resume import RESUMABLE_EXIT_CODE

    for path, text in relaunch.files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(path, 0o600)  # also when the file was there before
    print(f"launching {relaunch.argv[relaunch.argv.index('-m') + 1]}: {relaunch}", flush=True)
    proc = subprocess.Popen(relaunch.argv, env={**os.environ, **relaunch.env}, preexec_fn=_ignore_usr1)
    stopped: list[int] = []

    def forward(signum, _frame):
        stopped.append(signum)
        print(f"received {signal.Signals(signum).name}: asking the ranks to checkpoint and stop", file=sys.stderr,
              flush=True)
        for rank_proc in _rank_processes(proc.pid):
            try:
                rank_proc.send_signal(signum)
            except Exception:  # noqa: BLE001 - a rank that already exited
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and stopped:
        # Ranks exit with RESUMABLE_EXIT_CODE after their checkpoint; launchers report a plain failure.
        return RESUMABLE_EXIT_CODE
    return code

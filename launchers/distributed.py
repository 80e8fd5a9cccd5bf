"""Multi-process runs: the same `python -m pipeline ...` command, re-run under torchrun or the
DeepSpeed launcher when `deployment.launcher` asks for one and this process is not a rank yet.

The parent stays alive while the ranks run: it forwards SIGUSR1 / SIGTERM to the ranks (so that
they save a checkpoint at their next step, see pipeline/resume.py; on several nodes as a stop
file) and returns the launcher's exit code, or RESUMABLE_EXIT_CODE when a stop signal ended the
run early.

On several nodes (DeepSpeed launcher + hostfile) the ranks start through pdsh/ssh in bare login
shells: the overrides and variables travel in a launch file, and stop requests in a stop file
(launchers/node_launch.py).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from pipeline.config import ConfigError, RunConfig
from pipeline.dist import free_port
from pipeline.errors import RESUMABLE_EXIT_CODE
from pipeline.launchers.hostfile import HostfileError, read_hostfile
from pipeline.launchers.node_launch import LAUNCH_ENV, launch_payload, write_private
from pipeline.launchers.process_env import RELAUNCHED_ENV, inside_launcher, job_nodes, rendezvous_port, this_node_rank

MULTI_PROCESS_LAUNCHERS = ("torchrun", "deepspeed")


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
    files: dict[str, str] = field(default_factory=dict)  # path -> text: written (mode 600) for the run, removed after
    stop_file: str | None = None  # several nodes: stop requests go through this file, not signals

    def __str__(self) -> str:
        return shlex.join(self.argv)


def child_overrides(task_overrides: list[str], output_dir: str, hydra_dir: str | None) -> list[str]:
    """The overrides the ranks get: the user's (this job's, in a multirun), the run folder pinned to
    the parent's, and no second copy of Hydra's .hydra/ files."""
    pinned = ("run.output_dir=", "+run.output_dir=", "++run.output_dir=")
    out = [o for o in task_overrides if not o.startswith(pinned)]
    out.append(f"run.output_dir={output_dir}")
    if hydra_dir:
        out.append(f"hydra.run.dir={hydra_dir}")
    out.append("hydra.output_subdir=null")
    return out


def relaunch_command(cfg: RunConfig, overrides: list[str], env: os._Environ | dict = os.environ,
                     port: int | None = None) -> Relaunch:
    """The launcher command line that runs `python -m pipeline <overrides>` on every rank; on
    several nodes through pdsh the overrides go in the launch file instead (launchers/node_launch.py)."""
    dep = cfg.deployment
    nprocs = procs_per_node(cfg)
    port = port or dep.master_port or free_port()
    child_env = {RELAUNCHED_ENV: "1"}
    if dep.launcher == "torchrun":
        master = dep.master_addr
        if dep.nodes > 1:
            node_rank = this_node_rank(env)
            nodes = job_nodes(env)
            if master in ("127.0.0.1", "localhost") and nodes:
                master = nodes[0]  # a SLURM job: node 0 is the first of its nodes
            if node_rank is None or master in ("127.0.0.1", "localhost"):
                raise ConfigError(
                    f"deployment.nodes={dep.nodes} with deployment.launcher=torchrun: run the same command on every node "
                    "with NODE_RANK set and deployment.master_addr=<node 0's address>, or use "
                    "+deployment=multi_node (DeepSpeed launcher + hostfile) or the SLURM launcher")
            if not dep.master_port:  # every node must pick the same one
                port = rendezvous_port(env)
                if port is None:
                    raise ConfigError(f"deployment.nodes={dep.nodes} with deployment.launcher=torchrun needs "
                                      "deployment.master_port=<a port free on node 0>, the same on every node")
        else:
            node_rank = "0"
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={dep.nodes}", f"--nproc_per_node={nprocs}",
                f"--node_rank={node_rank}", f"--master_addr={master}", f"--master_port={port}",
                "-m", "pipeline", *overrides]
        return Relaunch(argv, child_env)
    if dep.launcher == "deepspeed":
        argv = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if dep.hostfile:
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
            argv += ["--hostfile", dep.hostfile, f"--num_nodes={dep.nodes}", f"--master_addr={master}"]
        elif dep.nodes > 1:
            raise ConfigError(f"deployment.nodes={dep.nodes} with deployment.launcher=deepspeed needs "
                              "deployment.hostfile=<file with one 'host slots=N' line per node>")
        else:
            # No hostfile: DeepSpeed's runner uses this machine only.
            argv += [f"--master_addr={dep.master_addr}"]
        argv += [f"--num_gpus={nprocs}", f"--master_port={port}", "--no_local_rank", "--module", "pipeline"]
        if dep.hostfile and dep.nodes > 1:
            # Through pdsh: no user text on the command line; it all travels in the launch file.
            folder = cfg.output_dir.expanduser().resolve() / ".launch"
            launch, stop = str(folder / "node_launch.json"), str(folder / "stop")
            payload = launch_payload(overrides, {**env, **child_env}, os.path.dirname(sys.executable), stop,
                                     f"{master}:{port}")
            return Relaunch(argv, {**child_env, LAUNCH_ENV: launch}, {launch: json.dumps(payload, indent=1)}, stop)
        return Relaunch(argv + list(overrides), child_env)
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
    """Run the launcher, forward stop signals to the ranks, return the exit code to use.

    On several nodes the launcher runs in its own session: a SIGTERM to this process group (a
    scheduler, systemd) would otherwise reach DeepSpeed's runner, whose handler kills every rank
    on every node before it can checkpoint. Ctrl-C (SIGINT) is passed on to it: a hard stop."""
    if relaunch.stop_file and os.path.exists(relaunch.stop_file):
        os.remove(relaunch.stop_file)  # left by a run that was stopped: this one starts afresh
    launched: list[subprocess.Popen] = []
    stopped: list[int] = []

    def forward(signum, _frame):
        stopped.append(signum)
        print(f"received {signal.Signals(signum).name}: asking the ranks to checkpoint and stop", file=sys.stderr,
              flush=True)
        if relaunch.stop_file:
            try:
                write_private(relaunch.stop_file, signal.Signals(signum).name)
            except OSError as err:
                print(f"could not write {relaunch.stop_file} ({err}); the ranks go on", file=sys.stderr, flush=True)
            return
        for rank_proc in _rank_processes(launched[0].pid) if launched else []:
            try:
                rank_proc.send_signal(signum)
            except Exception:
                pass

    def interrupt(signum, _frame):
        if launched:
            launched[0].send_signal(signal.SIGINT)

    handlers = {signal.SIGUSR1: forward, signal.SIGTERM: forward}
    if relaunch.stop_file:
        handlers[signal.SIGINT] = interrupt
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        for path, text in relaunch.files.items():
            write_private(path, text)
        if stopped:
            return RESUMABLE_EXIT_CODE  # asked to stop before anything started
        print(f"launching {relaunch.argv[relaunch.argv.index('-m') + 1]}: {relaunch}", flush=True)
        launched.append(subprocess.Popen(relaunch.argv, env={**os.environ, **relaunch.env}, preexec_fn=_ignore_usr1,
                                         start_new_session=bool(relaunch.stop_file)))
        code = launched[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for path in [*relaunch.files, relaunch.stop_file]:
            if path and os.path.exists(path):
                os.remove(path)  # the launch file may hold tokens
    if code != 0 and stopped:
        # Ranks exit with RESUMABLE_EXIT_CODE after their checkpoint; launchers report a plain failure.
        return RESUMABLE_EXIT_CODE
    return code

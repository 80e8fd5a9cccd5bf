"""From a composed Hydra config to a finished run, turning known failures into one-line errors.

Where the processes come from (launchers/):
- no deployment / single_gpu: this process runs the stages;
- single_node / multi_node (torchrun, deepspeed): not yet a rank -> the same command again under
  the launcher, every rank runs the same stages (only rank 0 writes manifests, reports, models);
- inside a SLURM job step: torch.distributed from SLURM's variables; a pre-empted run requeues.
- Hydra multirun (-m): each job runs in its own folder, hydra.sweep.dir/hydra.sweep.subdir.

One run per run folder (pipeline/lock.py): the launching process (node 0's, with torchrun on
several nodes) holds the folder for the whole run and passes its token to the ranks; without a
launching process, rank 0 holds it. Other ranks never lock. Dry runs write nothing and take no lock.

Errors: a UserError, and an OSError a user can fix (a read-only, full or unwritable place, a file
where a folder should be), print one line `error: <culprit>: <what is wrong>; <what to do>` and
exit 2; PIPELINE_DEBUG=1 or hydra.verbose adds the traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.config import RunConfig, load_config
from pipeline.errors import RESUMABLE_EXIT_CODE, USER_ERROR_EXIT_CODE, UserError
from pipeline.launchers.distributed import child_overrides, needs_relaunch, relaunch_command, run_relaunch
from pipeline.launchers.process_env import in_job_step, this_node_rank
from pipeline.launchers.slurm import export_torch_env, requeue_after_preemption
from pipeline.launchers.slurm import register_resolvers as register_launcher_resolvers
from pipeline.lock import TOKEN_ENV, RunLock, held_with, wait_for_rank0
from pipeline.runner import check_output_dir, run_pipeline

register_launcher_resolvers()  # conf/hydra/launcher/slurm.yaml resolves ${slurm_tasks_per_node:...}

DEBUG_ENV = "PIPELINE_DEBUG"
_FREE_SPACE_THEN_RESUME = "free space there, then run the same command again: it resumes from the last complete checkpoint"
_WRITABLE = "set run.output_dir (or the path's own setting) to a place this user can write"
# errno -> (what is wrong, what to do) for the OSErrors a user causes and fixes.
OS_CONDITIONS = {
    errno.EROFS: ("read-only file system", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.ENOSPC: ("no space left on device", _FREE_SPACE_THEN_RESUME),
    errno.EDQUOT: ("disk quota exceeded", _FREE_SPACE_THEN_RESUME),
    errno.ENOTDIR: ("a file, not a folder", "move it away or choose another path (run.output_dir, or the path's own setting)"),
    errno.EEXIST: ("a file, not a folder", "move it away or choose another path (run.output_dir, or the path's own setting)"),
    errno.EISDIR: ("a folder is where a file should be", "move that folder away or choose another path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}


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


def show_tracebacks() -> bool:
    """PIPELINE_DEBUG=1 or hydra.verbose: the one-line errors come with their traceback."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


def fail(message: str) -> NoReturn:
    if show_tracebacks():
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT_CODE)


def _file_in_the_way(path: Path) -> Path | None:
    """The file (not folder) that stands where `path` or one of its parent folders should be."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            return part if not part.is_dir() else None
    return None


def os_error_line(err: OSError, run_dir: Path | None) -> str | None:
    """The one line for an OSError the user can fix (`<culprit>: <what is wrong>; <what to do>`),
    None for any other. The culprit is run.output_dir when the path lies in the run folder."""
    if err.errno not in OS_CONDITIONS:
        return None
    condition, todo = OS_CONDITIONS[err.errno]
    path = Path(os.path.abspath(os.fsdecode(err.filename))) if err.filename else None
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        path = _file_in_the_way(path) if path else None  # the file standing where a folder should be
        if path is None:
            return None  # an existing folder, say: not one we foresee
    if path is None:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return None
        # A write on an open file: Python names no path. The run folder is where a run writes.
        culprit = (f"run.output_dir={run_dir} ({shutil.disk_usage(_existing(run_dir)).free / 2**20:.0f} MiB free)"
                   if run_dir else "the run folder or a cache (the file is not named)")
    elif run_dir is not None and path.is_relative_to(run_dir):
        culprit = f"run.output_dir={run_dir}" + ("" if path == run_dir else f" ({path})")
    else:
        culprit = str(path)
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and run_dir is not None:
        kept = [str(p.parent / p.read_text().strip()) for p in sorted(run_dir.glob("*/checkpoints/latest"))]
        todo += f" ({', '.join(kept)})" if kept else " (none was written yet)"
    return f"{culprit}: {condition}; {todo}"


def one_line(err: BaseException, run_dir: Path | None) -> str | None:
    """The one line to print for an error the user can fix; None for a bug (it keeps its traceback).
    An OSError counts also as the explicit cause of another error (logging raises ValueError from
    the OSError of a log file it cannot open)."""
    if isinstance(err, UserError):
        return str(err)
    while err is not None:
        if isinstance(err, OSError) and (line := os_error_line(err, run_dir)):
            return line
        # A full disk seen by a library that raises its own error type (safetensors: "I/O error: No
        # space left on device (os error 28)").
        for code in (errno.ENOSPC, errno.EDQUOT):
            if os.strerror(code) in str(err):
                return os_error_line(OSError(code, os.strerror(code)), run_dir)
        err = err.__cause__
    return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def folder_held_by_rank0(run_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run folder while the run lasts: through the lock its launching process took
    (the token in TOKEN_ENV) when there is one, else its own. Other ranks take none; in a SLURM job
    step (no launching process) they wait until rank 0 holds it, and stop if another run does."""
    inherited = os.environ.get(TOKEN_ENV)
    if os.environ.get("RANK", "0") != "0":
        if in_job_step() and not inherited:
            wait_for_rank0(run_dir)
        yield
        return
    if inherited and held_with(run_dir, inherited):
        yield
        return
    with RunLock(run_dir):
        yield


def relaunch(cfg: RunConfig, run_dir: Path, overrides: list[str], hydra_dir: str | None) -> None:
    """Run the same command under the launcher, holding the run folder for the ranks (on several
    torchrun nodes, node 0's launching process holds it)."""
    lock = RunLock(run_dir) if this_node_rank() in (None, "0") else None
    with lock or nullcontext():
        if lock is not None:
            os.environ[TOKEN_ENV] = lock.token  # the ranks get it: inherited, or in the launch file
        try:
            code = run_relaunch(relaunch_command(cfg, child_overrides(overrides, str(run_dir), hydra_dir)))
        finally:
            os.environ.pop(TOKEN_ENV, None)
    if code == RESUMABLE_EXIT_CODE:
        requeue_after_preemption()
    if code:
        sys.exit(code)


def execute(composed: DictConfig) -> dict | None:
    run_dir = None
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
        run_dir = cfg.output_dir.expanduser().resolve()
        check_output_dir(run_dir)  # a file or a read-only place: said before the lock tries to write there
        export_torch_env(cfg)  # inside a SLURM job step: RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM
        if needs_relaunch(cfg):
            relaunch(cfg, run_dir, overrides, None if multirun else hydra_dir)
            return None
        with folder_held_by_rank0(run_dir):
            try:
                return run_pipeline(cfg)
            except SystemExit as stop:
                if stop.code == RESUMABLE_EXIT_CODE:
                    requeue_after_preemption()
                raise
    except Exception as err:
        line = one_line(err, run_dir)
        if line is None:
            raise
        fail(line)

"""Where a stage starts from, and pre-emption: SIGTERM / SIGUSR1 ask the stage to save a
checkpoint at the next step and exit with RESUMABLE_EXIT_CODE (run the command again to go on)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from pipeline.launchers.node_launch import stop_file_present
from pipeline.checkpoint import Checkpointer
from pipeline.dist import any_rank
from pipeline.errors import RESUMABLE_EXIT_CODE
from pipeline.config import ConfigError, RunConfig

_stop = {"requested": False}


def install_signal_handlers() -> None:
    def handler(signum, _frame):
        _stop["requested"] = True
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step, then exiting "
              f"(resumable, exit code {RESUMABLE_EXIT_CODE})", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def stop_requested(exit_if_set: bool = False) -> bool:
    """True on every rank when any rank got a stop signal (or, on several nodes, the launching
    process left a stop file); with exit_if_set, exit resumable."""
    requested = any_rank(_stop["requested"] or stop_file_present())
    if requested and exit_if_set:
        print("checkpoint saved; exiting so the job can be resumed", file=sys.stderr, flush=True)
        sys.exit(RESUMABLE_EXIT_CODE)
    return requested


def resume_point(cfg: RunConfig, checkpointer: Checkpointer) -> Path | None:
    """run.resume: auto = the stage's latest complete checkpoint, never = none, else a path."""
    mode = cfg.run.resume
    if mode == "never":
        return None
    if mode == "auto":
        return checkpointer.latest()
    path = Path(mode).expanduser()
    if not (path / "state.json").exists():
        raise ConfigError(f"run.resume={mode}: not a checkpoint folder (no state.json)")
    if not path.resolve().is_relative_to(cfg.output_dir.resolve()):
        # DeepSpeed unpickles its optimizer states: only what this run wrote is trusted.
        raise ConfigError(f"run.resume={mode}: checkpoints are only resumed from inside this run's folder "
                          f"({cfg.output_dir}); copy the run there or set run.output_dir to its run")
    # A path names one stage's checkpoint; other stages start as auto would.
    return path if path.parent.resolve() == checkpointer.root.resolve() else checkpointer.latest()


def resume_stage(cfg: RunConfig, checkpointer: Checkpointer, stage: str, logger, engines: dict,
                 rank_states: dict | None = None) -> dict:
    """Load the checkpoint `run.resume` points at into `engines` (and `rank_states`) and return its
    state ({"step": 0} on a fresh start). Metrics rows written after that step are dropped."""
    path = resume_point(cfg, checkpointer)
    if path is None:
        logger.truncate_after(-1)  # a fresh start drops the rows of an earlier attempt
        return {"step": 0}
    try:
        state = checkpointer.load(path, engines, rank_states)
    except ValueError as err:  # a checkpoint of another layout: say which, keep it on disk
        raise ConfigError(f"run.resume={cfg.run.resume}: {err}") from None
    logger.truncate_after(state["step"])
    print(f"[{stage}] resumed from {path} at step {state['step']}", flush=True)
    return state

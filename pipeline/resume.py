"""Where a stage starts from, and pre-emption: SIGTERM / SIGUSR1 ask the stage to save a
checkpoint at the next step and exit with RESUMABLE_EXIT_CODE (run the command again to go on)."""

from __future__ import annotations

import json
import re
import signal
import sys
import zlib
from pathlib import Path

from pipeline.checkpoint import Checkpointer, CheckpointError, ConfigRecord, read_config_record, step_of, verify
from pipeline.config import TRAINED_ROLES, ConfigError, RunConfig
from pipeline.dist import all_reduce_mean, any_rank, rank
from pipeline.errors import RESUMABLE_EXIT_CODE
from pipeline.launchers.node_launch import stop_file_present

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
    """The checkpoint to resume from, the same on every rank. run.resume: auto = the one `latest`
    names, never = none, else a path in this run's folder. One that fails verification (a file cut
    short or changed since it was written) is passed over with a warning for the newest older one
    that verifies; when checkpoints exist and none does, the stage stops with one line."""
    mode = cfg.run.resume
    if mode == "never":
        return None
    candidates = checkpointer.folders()
    if mode != "auto":
        path = Path(mode).expanduser()
        if not (path / "state.json").exists():
            raise ConfigError(f"run.resume={mode}: not a checkpoint folder (no state.json)")
        if not path.resolve().is_relative_to(cfg.output_dir.resolve()):
            # DeepSpeed unpickles its optimizer states: only what this run wrote is trusted.
            raise ConfigError(f"run.resume={mode}: checkpoints are only resumed from inside this run's folder "
                              f"({cfg.output_dir}); copy the run there or set run.output_dir to its run")
        # A path names one stage's checkpoint (others start as auto would); falling back goes to older steps only.
        if path.parent.resolve() == checkpointer.root.resolve():
            step = step_of(path)
            older = [p for p in candidates if step is not None and step_of(p) < step]
            candidates = [path] + sorted(older, key=step_of, reverse=True)
    return _agreed(_first_whole(candidates, checkpointer), checkpointer)


def _first_whole(candidates: list[Path], checkpointer: Checkpointer) -> Path | None:
    stage = checkpointer.root.parent.name
    problems = []
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        if rank() == 0:
            print(f"warning: [{stage}] checkpoint {path} is damaged ({problem}): trying the one before it",
                  file=sys.stderr, flush=True)
    if problems:
        raise CheckpointError(f"no checkpoint of {stage} in {checkpointer.root} can be resumed ({'; '.join(problems)}); "
                              f"run.resume=never starts {stage} over in {checkpointer.root.parent}")
    return None


def _agreed(path: Path | None, checkpointer: Checkpointer) -> Path | None:
    """`path`, once every rank has chosen the same one: each rank reads the folder itself, and on a
    shared file system ranks can (rarely) see different files."""
    choice = zlib.crc32(path.name.encode()) if path else -1
    mean = all_reduce_mean([float(choice)], 1.0)[0]  # equals every rank's choice only when they all agree
    if any_rank(choice != mean):
        raise CheckpointError(f"the ranks see different checkpoints in {checkpointer.root} (this rank, {rank()}, "
                              f"chose {path.name if path else 'none'}): the run folder must be on a file system every "
                              f"rank sees alike; run the same command again once it has settled")
    return path


def check_written_under(path: Path, current: ConfigRecord | None, stage: str) -> None:
    """Refuse a checkpoint written under another stage config, naming the first key that differs; a
    checkpoint from before checkpoints recorded their config is resumed with a warning."""
    if current is None:
        return
    saved = read_config_record(path)
    if saved is None:
        if rank() == 0:
            print(f"warning: [{stage}] checkpoint {path} records no config (written by an earlier version): "
                  f"resuming it as written under this one", file=sys.stderr, flush=True)
        return
    if saved.hash == current.hash:
        return
    # Compared as written to config.json (Paths as strings, tuples as lists)
    old, new = _flat(saved.sections), _flat(json.loads(json.dumps(current.sections, default=str)))
    key = next((k for k in [*new, *old] if old.get(k, _ABSENT) != new.get(k, _ABSENT)), None)
    change = (f"{key} {_shown(old.get(key, _ABSENT))} -> {_shown(new.get(key, _ABSENT))}" if key else
              f"config hash {saved.hash} -> {current.hash}")
    raise ConfigError(f"{path} was written under another {stage} config ({change}): set it back to resume "
                      f"from it, or run.resume=never to start {stage} over")


_ABSENT = object()


def _flat(sections: dict, prefix: str = "") -> dict[str, object]:
    """{"stage.sft": {"optim": {"learning_rate": 1e-3}}} -> {"stage.sft.optim.learning_rate": 1e-3}"""
    flat = {}
    for key, value in sections.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: object) -> str:
    return "(absent)" if value is _ABSENT else value if isinstance(value, str) else json.dumps(value, default=str)


# DeepSpeed writes one model-state file per tensor-parallel rank: mp_rank_01_model_states.pt (ZeRO 0-2),
# zero_pp_rank_0_mp_rank_01_model_states.pt (ZeRO-3).
_MP_RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def written_tp_degree(engine_folder: Path) -> int | None:
    """The tensor-parallel degree a DeepSpeed checkpoint (an engine's folder in a step folder) was
    written with: its number of mp_rank files (no pickle is read); None when it holds none."""
    ranks = {m.group(1) for f in Path(engine_folder).rglob("*_model_states.pt") if (m := _MP_RANK_FILE.search(f.name))}
    return len(ranks) or None


def check_tensor_parallel(path: Path, engines: dict, stage: str) -> None:
    """Refuse, before anything loads, a checkpoint whose engines were split over another
    tensor-parallel degree than this run's (DeepSpeed loads only the degree it wrote: a size mismatch
    or a missing key deep inside), naming the key to set."""
    from pipeline.engine import engine_tp_degree

    keys = {(s, role): key for s, role, key in TRAINED_ROLES}
    for name, engine in engines.items():
        saved, now = written_tp_degree(path / name), engine_tp_degree(engine)
        if saved is not None and saved != now:
            key = keys.get((stage, name), f"stage.{stage}.{name}")
            raise ConfigError(f"{path} was written with {key}.strategy.tp_degree={saved} and this run has {now}: DeepSpeed "
                              f"loads a checkpoint only into the tensor-parallel degree that wrote it; set "
                              f"{key}.strategy.tp_degree={saved} to resume from it, or run.resume=never to start {stage} over")


def resume_stage(cfg: RunConfig, checkpointer: Checkpointer, stage: str, logger, engines: dict,
                 rank_states: dict | None = None) -> dict:
    """Load the checkpoint `run.resume` points at (verified, and written under checkpointer.config)
    into `engines` (and `rank_states`) and return its state ({"step": 0} on a fresh start). Metrics
    rows written after that step are dropped."""
    path = resume_point(cfg, checkpointer)
    if path is None:
        logger.truncate_after(-1)  # a fresh start drops the rows of an earlier attempt
        return {"step": 0}
    check_written_under(path, checkpointer.config, stage)
    check_tensor_parallel(path, engines, stage)
    try:
        state = checkpointer.load(path, engines, rank_states)
    except ValueError as err:  # a checkpoint of another layout: say which, keep it on disk
        raise ConfigError(f"run.resume={cfg.run.resume}: {err}") from None
    logger.truncate_after(state["step"])
    print(f"[{stage}] resumed from {path} at step {state['step']}", flush=True)
    return state

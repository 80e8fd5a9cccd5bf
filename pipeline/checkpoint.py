"""Stage manifests and resumable checkpoints, written so a crash at any moment leaves the last
complete one usable: files and folders are written under a temporary name and renamed, and
the `latest` pointer moves only after the folder is complete.

Layout of a stage folder:
    manifest.json              written last: {"status": "done", "config_hash": ..., "result": {...}}
    metrics.jsonl
    checkpoints/step_000040/   engines' DeepSpeed checkpoints + state.json + rng_rank<r>.safetensors/json
                               (+ actor_ema_rank<r>.safetensors) + config.json + listing.json (written last)
    checkpoints/latest         name of the newest complete step folder
    final/                     Hugging Face format

listing.json names every file of its folder with its size, and with its sha256 when the file is
at most HASHED_UP_TO bytes: a checkpoint is resumed only when its files still match (a node crash
or a full disk cuts files short). Larger files (model and optimizer states) get their size only:
sha256 runs at 0.7-1 GB/s on one core (measured), which would add about 20 s to every save of an
OPT-1.3B run's 18 GB of states and about 15 minutes to OPT-66B's 0.9 TB on rank 0. Instead every
file is flushed to disk (fsync) before the folder is renamed, so a listed file cannot be left
unwritten by a power loss after the save. config.json holds the config the checkpoint was written
under (ConfigRecord), so a resume under another config is refused by key.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.dist import any_rank, barrier, rank
from pipeline.errors import UserError
from pipeline.files import atomic_write, write_json_atomic

LISTING = "listing.json"
CONFIG = "config.json"
HASHED_UP_TO = 64 * 2**20
# Less free space than this after a failed write means the disk is full: torch reports a full disk
# only as "unexpected pos ..." or "PytorchStreamWriter failed writing file ...", without errno.
NEARLY_FULL = 64 * 2**20


class CheckpointError(UserError):
    """A checkpoint cannot be written (full disk) or none of a stage's checkpoints can be resumed."""


@dataclass(frozen=True)
class ConfigRecord:
    """The config a stage's checkpoints are written under: its hash (pipeline.runner.stage_hash)
    and the sections that hash covers, {dotted key: value} (e.g. {"stage.sft": {...}, "run.seed": 1234}),
    so that a resume under another config can name the key that changed."""

    hash: str
    sections: dict[str, Any]


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest; None when it has none, or when it is damaged (a crash or a full disk
    can leave one cut short): the stage then counts as unfinished and runs again from its checkpoints."""
    path = Path(stage_dir) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        problem = None if isinstance(manifest, dict) else "not a JSON object"
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or not UTF-8
        problem = f"{type(err).__name__}: {err}"
    if problem is None:
        return manifest
    if rank() == 0:
        print(f"warning: {path} is damaged ({problem}): treating {path.parent.name} as unfinished, "
              f"it runs again from its last checkpoint", file=sys.stderr, flush=True)
    return None


def write_manifest(stage_dir: Path, config_hash: str, result: dict) -> None:
    write_json_atomic(Path(stage_dir) / "manifest.json",
                      {"status": "done", "config_hash": config_hash, "finished_at": time.time(), "result": result})


def save_rng_state(folder: Path, rank_id: int = 0) -> None:
    """Every RNG this process draws from, without pickle: tensors to rng_rank<r>.safetensors, the
    rest to rng_rank<r>.json."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    save_file(tensors, str(folder / f"rng_rank{rank_id}.safetensors"))
    (folder / f"rng_rank{rank_id}.json").write_text(json.dumps({
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss]}))


def load_rng_state(folder: Path, rank_id: int = 0) -> None:
    """This rank's RNG states (rank 0's when the run had fewer ranks)."""
    if not (folder / f"rng_rank{rank_id}.json").exists():
        rank_id = 0
    tensors = load_file(str(folder / f"rng_rank{rank_id}.safetensors"))
    plain = json.loads((folder / f"rng_rank{rank_id}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{path relative to folder: {"bytes": size, "sha256": hex (files up to HASHED_UP_TO only)}}
    of every file under `folder` but the listing itself; each file is flushed to disk on the way."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != LISTING):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
            entry: dict[str, Any] = {"bytes": size}
            if size <= HASHED_UP_TO:
                entry["sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
        files[path.relative_to(folder).as_posix()] = entry
    return files


def verify(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (the first damaged file, expected vs found), or None
    when it is whole. Folders written before listings existed need only their state.json."""
    if not (folder / "state.json").is_file():
        return "state.json is missing"
    if not (folder / LISTING).exists():
        return None
    try:
        listed = json.loads((folder / LISTING).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{LISTING} is unreadable ({type(err).__name__}: {err})"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, {expected['bytes']} expected"
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{name} has {size} bytes as expected but not the content that was written (sha256 differs)"
    return None


def read_config_record(folder: Path) -> ConfigRecord | None:
    """The config a checkpoint was written under; None for checkpoints from before they recorded it."""
    path = folder / CONFIG
    return ConfigRecord(**json.loads(path.read_text())) if path.exists() else None


def _free_bytes(folder: Path) -> int:
    """Space an unprivileged write can still use on the file system of `folder` (or its nearest
    existing parent)."""
    stats = os.statvfs(next(p for p in (folder, *folder.parents) if p.exists()))
    return stats.f_bavail * stats.f_frsize


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT in the error or its causes, or (torch
    and safetensors hide errno) next to no space left where it wrote."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    return _free_bytes(folder) < NEARLY_FULL


def step_of(folder: Path) -> int | None:
    """42 for step_000042; None for a name that is not a step folder's."""
    digits = folder.name.removeprefix("step_")
    return int(digits) if folder.name.startswith("step_") and digits.isdigit() else None


class Checkpointer:
    """Saves every `every_steps` steps or `every_minutes` minutes; keeps the last `keep`. `config`:
    what the stage runs under, recorded in every checkpoint and checked on resume (pipeline.resume)."""

    def __init__(self, stage_dir: Path, every_steps: int, every_minutes: float, keep: int,
                 config: ConfigRecord | None = None):
        self.root = Path(stage_dir) / "checkpoints"
        self.every_steps, self.every_minutes, self.keep = every_steps, every_minutes, max(keep, 1)
        self.config = config
        self.last_save = time.time()

    def due(self, step: int) -> bool:
        """Collective: every rank gets the same answer (clocks differ, and a save is collective)."""
        due = bool(self.every_steps and step % self.every_steps == 0) or (
            bool(self.every_minutes) and time.time() - self.last_save >= 60 * self.every_minutes)
        return any_rank(due)

    def folders(self) -> list[Path]:
        """Checkpoint folders in the order a resume tries them: the one `latest` names, then the
        others newest first."""
        found = sorted((p for p in self.root.glob("step_*") if p.is_dir() and step_of(p) is not None),
                       key=step_of, reverse=True)
        pointer = self.root / "latest"
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        return [named] + [p for p in found if p != named] if named in found else found

    def last_complete(self) -> Path | None:
        """The checkpoint a resume would start from, or None."""
        return next((p for p in self.folders() if verify(p) is None), None)

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any], rank_states: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. `engines` are DeepSpeed engines by name; `rank_states`
        hold tensors per rank (the EMA: state_dict / load_state_dict), stored as <name>_rank<r>.safetensors.
        A write that fails (a full disk) removes the temporary folder and stops with a CheckpointError on
        every rank; complete checkpoints are not touched."""
        name = f"step_{step:06d}"
        tmp = self.root / f".tmp_{name}"

        def start() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        def write_parts() -> None:
            for key, engine in engines.items():
                engine.save_checkpoint(str(tmp / key), tag="state", save_latest=False)
            save_rng_state(tmp, rank())  # every rank draws its own numbers
            for key, holder in (rank_states or {}).items():
                save_file({k: v.contiguous() for k, v in holder.state_dict().items()},
                          str(tmp / f"{key}_rank{rank()}.safetensors"))

        def complete() -> None:
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
            if self.config is not None:
                (tmp / CONFIG).write_text(json.dumps(asdict(self.config), indent=2, default=str))
            write_json_atomic(tmp / LISTING, {"files": list_files(tmp)})  # last, so that it lists every file
            # Lets the crash-during-save test kill the process between writing and renaming
            # (PIPELINE_CHECKPOINT_PAUSE_AT=ppo/step_000008 holds that one save for a minute).
            if os.environ.get("PIPELINE_CHECKPOINT_PAUSE_AT") == f"{self.root.parent.name}/{name}":
                time.sleep(60)
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", name)
            self._prune(step)

        try:
            self._on_every_rank(name, tmp, start if rank() == 0 else None)
            self._on_every_rank(name, tmp, write_parts)
            self._on_every_rank(name, tmp, complete if rank() == 0 else None)
        except BaseException:
            if rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_save = time.time()
        return self.root / name

    def _on_every_rank(self, name: str, tmp: Path, write: Callable[[], None] | None) -> None:
        """Run this rank's part of a save (`write`; None: nothing to do here). When it fails on any
        rank, every rank stops (none is left waiting in a later collective) and the temporary folder
        goes: with one line when the disk is full or the OS refused the write, else (a bug) with the
        error itself."""
        error = None
        try:
            if write is not None:
                write()
        except (OSError, RuntimeError, SafetensorError) as err:  # torch reports a full disk as RuntimeError
            error = err
        if not any_rank(error is not None):
            return
        full = error is not None and _disk_full(error, tmp)
        free = _free_bytes(tmp)
        barrier()  # every rank has looked at the disk before the temporary folder is removed
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, RuntimeError) and not full:
            raise error
        kept = self.last_complete()
        kept = f"the last complete checkpoint, {kept}, is kept" if kept else "no complete checkpoint was written yet"
        if error is None:
            why, todo = "writing it failed on another rank (see that rank's error)", "run the same command to resume"
        elif full:
            why = f"no space left on device writing {tmp} ({free / 2**20:.1f} MiB free)"
            todo = "free some space and run the same command to resume"
        else:
            why = f"writing {tmp} failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            todo = "fix that and run the same command to resume"
        raise CheckpointError(f"{self.root.parent.name} checkpoint {name} not saved: {why}; {kept}; {todo}") from error

    def load(self, path: Path, engines: dict[str, Any], rank_states: dict[str, Any] | None = None) -> dict[str, Any]:
        for key, engine in engines.items():
            engine.load_checkpoint(str(path / key), tag="state", load_module_strict=False)
        for key, holder in (rank_states or {}).items():
            own = path / f"{key}_rank{rank()}.safetensors"
            if not own.exists() and not getattr(holder, "sharded", True):  # the same on every rank: any copy serves
                own = path / f"{key}_rank0.safetensors"
            if not own.exists():
                raise ValueError(f"{path} holds no {key} state for rank {rank()}: it was written by fewer ranks "
                                 f"than this run has; resume with the world size it was written with, or run.resume=never")
            holder.load_state_dict(load_file(str(own)))
        load_rng_state(path, rank())
        return json.loads((path / "state.json").read_text())

    def _prune(self, saved_step: int) -> None:
        """Keep the newest `keep` folders up to the one just saved. Folders of later steps belong to an
        abandoned attempt (a run.resume=never start, or a resume that fell back past a damaged
        checkpoint): this run writes those steps again, and they must not push its own out of `keep`."""
        steps = {p: step_of(p) for p in self.root.glob("step_*") if p.is_dir() and step_of(p) is not None}
        kept = sorted((p for p, s in steps.items() if s <= saved_step), key=steps.get)[-self.keep:]
        for folder in steps:
            if folder not in kept:
                shutil.rmtree(folder, ignore_errors=True)

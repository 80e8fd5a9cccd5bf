"""Stage manifests and resumable checkpoints, written so a crash at any moment leaves the last
complete one usable: files and folders are written under a temporary name and renamed, and
the `latest` pointer moves only after the folder is complete.

Layout of a stage folder:
    manifest.json              written last: {"status": "done", "config_hash": ..., "result": {...}}
    metrics.jsonl
    checkpoints/step_000040/   engines' DeepSpeed checkpoints + state.json + rng_rank<r>.safetensors/json (+ actor_ema_rank<r>.safetensors)
    checkpoints/latest         name of the newest complete step folder
    final/                     Hugging Face format
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.dist import any_rank, barrier, rank
from pipeline.files import atomic_write, write_json_atomic


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


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


class Checkpointer:
    """Saves every `every_steps` steps or `every_minutes` minutes; keeps the last `keep`."""

    def __init__(self, stage_dir: Path, every_steps: int, every_minutes: float, keep: int):
        self.root = Path(stage_dir) / "checkpoints"
        self.every_steps, self.every_minutes, self.keep = every_steps, every_minutes, max(keep, 1)
        self.last_save = time.time()

    def due(self, step: int) -> bool:
        """Collective: every rank gets the same answer (clocks differ, and a save is collective)."""
        due = bool(self.every_steps and step % self.every_steps == 0) or (
            bool(self.every_minutes) and time.time() - self.last_save >= 60 * self.every_minutes)
        return any_rank(due)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; if it is gone or incomplete, the newest complete one."""
        pointer = self.root / "latest"
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if (path / "state.json").exists():
                return path
        complete = sorted(p for p in self.root.glob("step_*") if (p / "state.json").exists())
        return complete[-1] if complete else None

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any], rank_states: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. `engines` are DeepSpeed engines by name; `rank_states`
        hold tensors per rank (the EMA: state_dict / load_state_dict), stored as <name>_rank<r>.safetensors."""
        name = f"step_{step:06d}"
        tmp = self.root / f".tmp_{name}"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for key, engine in engines.items():
            engine.save_checkpoint(str(tmp / key), tag="state", save_latest=False)
        save_rng_state(tmp, rank())  # every rank draws its own numbers
        for key, holder in (rank_states or {}).items():
            save_file({k: v.contiguous() for k, v in holder.state_dict().items()}, str(tmp / f"{key}_rank{rank()}.safetensors"))
        barrier()
        if rank() == 0:
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
            # Lets the crash-during-save test kill the process between writing and renaming
            # (PIPELINE_CHECKPOINT_PAUSE_AT=ppo/step_000008 holds that one save for a minute).
            if os.environ.get("PIPELINE_CHECKPOINT_PAUSE_AT") == f"{self.root.parent.name}/{name}":
                time.sleep(60)
            final = self.root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write(self.root / "latest", name)
            self._prune()
        barrier()
        self.last_save = time.time()
        return self.root / name

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

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

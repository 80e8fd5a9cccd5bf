"""Processed-data cache: never pickle. Examples are Arrow tables (`datasets.save_to_disk`),
PTX blocks are .npy (loaded with allow_pickle=False), summaries are JSON.

An entry lives in <cache_dir>/<kind>-<hash>/, where the hash covers everything that shapes
it (config, tokenizer, source files' size and mtime). Rank 0 builds it into a temporary
folder and renames it into place; the other ranks wait at a barrier and read it. When rank 0
fails, it leaves an error note so the other ranks raise the same error instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.dist import barrier, rank, world_size

# 2: examples memory-mapped as int32 columns; preference labels outside the mapping stop the run.
# 3: the built-in task holds one phrasing per fact out of training, and has contested facts.
CACHE_VERSION = 3


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what makes the tokenizer produce its ids (vocab, merges, specials, template)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = [type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
              getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_bos_token", None),
              getattr(tokenizer, "add_eos_token", None)]
    h.update(json.dumps(extras, default=str).encode())
    return h.hexdigest()[:16]


def file_fingerprint(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def key_of(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_or_load(entry: Path, build: Callable[[Path], None], load: Callable[[Path], Any]) -> tuple[Any, bool]:
    """(load(entry), hit). Rank 0 runs build(tmp) when `entry` is missing; every rank then loads it."""
    from pipeline.data.sources import DataError

    rank_id, world = rank(), world_size()
    hit = entry.exists()
    error_note = entry.with_name(entry.name + ".error")
    if rank_id == 0:
        error_note.unlink(missing_ok=True)
        if not hit:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
            try:
                build(tmp)
                try:
                    os.replace(tmp, entry)
                except OSError:  # another run put it in place first
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException as err:
                shutil.rmtree(tmp, ignore_errors=True)
                if world > 1:
                    error_note.write_text(str(err))
                    barrier()
                raise
    if world > 1:
        barrier()
        if rank_id != 0 and error_note.exists():
            raise DataError(error_note.read_text())
    return load(entry), hit or rank_id != 0  # other ranks never build: they read rank 0's entry

"""Atomic writes: a reader (or a rerun after a crash) sees the old file or the new one, never half.

Every file or folder the pipeline must not leave half-written (manifests, checkpoints' pointers,
metrics rewrites, reports, launch files, built-in models, cache entries) goes through here: the
content is written under a temporary name in the same folder, flushed to disk, then renamed into
place with `os.replace`. A failed write (a full disk) removes its temporary file and re-raises.

Standard library only: the launchers import it before any other library is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes, private: bool = False) -> None:
    """Write `data` to `path` atomically. private: mode 600 from the first byte (the file may hold
    tokens), created exclusively and never through a link planted at the temporary name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if private:
        flags |= os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        tmp.unlink(missing_ok=True)
    fd = os.open(tmp, flags, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_dir(path: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a folder through `write(tmp)` under a temporary name, then rename it into place
    (replacing an older one). A failed `write` leaves no temporary folder behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

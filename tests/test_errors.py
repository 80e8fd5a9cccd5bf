"""The top-level handler (pipeline/cli.py, pipeline/__main__.py): every error a user can foresee is one
line `error: <culprit>: <what is wrong>; <what to do>`, exit 2, no traceback unless asked for
(PIPELINE_DEBUG=1, hydra.verbose), and nothing already written is lost. Through the CLI, as users
meet them: the run folder is a file, read-only, full."""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from pipeline.cli import one_line

SFT = ["+experiment=demo", "run.stages=[sft]", "stage.sft.per_device_train_batch_size=8"]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a run that stopped with exit 2 and no traceback."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@contextmanager
def tmpfs(path: Path, size: str):
    """A small file system of its own at `path` (needs root and the right to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def test_a_run_folder_that_is_a_file(tmp_path: Path):
    """Where Hydra makes <run>/.hydra (before our code) and where our code makes the folder first
    (Hydra's record elsewhere): both name the file, and it is left as it was."""
    blocker = tmp_path / "results"
    blocker.write_text("my notes\n")
    line = error_line(run_cli(*SFT, f"run.output_dir={blocker}"))
    assert line == (f"error: {blocker}: a file, not a folder; move it away or choose another path "
                    "(run.output_dir, or the path's own setting)")
    assert error_line(run_cli(*SFT, f"run.output_dir={blocker}/run")) == line  # a parent that is a file
    ours = error_line(run_cli(*SFT, f"run.output_dir={blocker}", f"hydra.run.dir={tmp_path / 'hydra'}"))
    assert ours.startswith(f"error: run.output_dir={blocker}: ") and "is a file, not a folder; " in ours
    assert blocker.read_text() == "my notes\n"


def test_tracebacks_only_when_asked_for(tmp_path: Path):
    blocker = tmp_path / "results"
    blocker.write_text("")
    debug = run_cli(*SFT, f"run.output_dir={blocker}", env={"PIPELINE_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "FileExistsError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith(f"error: {blocker}: a file, not a folder")
    verbose = run_cli(*SFT, f"run.output_dir={blocker}", f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.verbose=true")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith(f"error: run.output_dir={blocker}: ")


def test_a_read_only_run_folder_loses_nothing(tmp_path: Path):
    """A finished run whose folder has become read-only, run again with more steps."""
    with tmpfs(tmp_path / "fs", "64m") as fs:
        out = fs / "run"
        first = run_cli(*SFT, "stage.sft.max_steps=2", f"run.output_dir={out}")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        before = snapshot(out)
        line = error_line(run_cli(*SFT, "stage.sft.max_steps=3", f"run.output_dir={out}"))
        assert line == f"error: run.output_dir={out}: {out} is on a read-only file system; choose another run.output_dir"
        assert snapshot(out) == before


def test_a_full_disk(tmp_path: Path):
    """400 KiB: full while the run writes its built-in base model (safetensors raises its own error
    type); config.yaml and the plan, written before, stay whole; the lock is gone."""
    with tmpfs(tmp_path / "fs", "400k") as fs:
        out = fs / "run"
        line = error_line(run_cli(*SFT, "stage.sft.max_steps=2", f"run.output_dir={out}"))
        assert line.startswith(f"error: run.output_dir={out} (0 MiB free): no space left on device; free space there, "
                               "then run the same command again")
        assert OmegaConf.load(out / "config.yaml").run.output_dir == str(out)
        assert (out / "plan.json").read_text().rstrip().endswith("}") and not (out / ".lock").exists()


def test_which_errors_become_one_line(tmp_path: Path):
    """OSErrors with a path a user can fix, and a full disk in any library's words; not bugs."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "sft" / "checkpoints" / "step_000004").mkdir(parents=True)
    (run / "sft" / "checkpoints" / "latest").write_text("step_000004\n")
    full = one_line(OSError(errno.ENOSPC, "No space left on device"), run)
    assert full.startswith(f"run.output_dir={run} (") and full.endswith(
        f"MiB free): no space left on device; free space there, then run the same command again: it resumes from "
        f"the last complete checkpoint ({run}/sft/checkpoints/step_000004)")
    assert one_line(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), run) == full
    denied = one_line(PermissionError(errno.EACCES, "Permission denied", str(run / "rm")), run)
    assert denied == (f"run.output_dir={run} ({run}/rm): permission denied; set run.output_dir (or the path's own "
                      "setting) to a place this user can write")
    assert one_line(OSError(errno.EROFS, "Read-only file system", "/data/cache"), run).startswith(
        "/data/cache: read-only file system; ")
    assert one_line(OSError(errno.EDQUOT, "Disk quota exceeded", str(run / "x")), run).startswith(
        f"run.output_dir={run} ({run}/x): disk quota exceeded; ")
    try:  # how logging reports a log file it cannot open
        raise ValueError("Unable to configure handler 'file'") from OSError(errno.EROFS, "Read-only", "/ro/x.log")
    except ValueError as wrapped:
        assert one_line(wrapped, run) == ("/ro/x.log: read-only file system; set run.output_dir (or the path's own "
                                          "setting) to a place this user can write")
    assert one_line(FileExistsError(errno.EEXIST, "File exists", str(run)), run) is None  # a folder: a bug if anything
    assert one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", str(run / "sft" / "final")), run) is None
    assert one_line(ValueError("bug"), run) is None


def test_ptx_text_shorter_than_one_batch_is_a_data_error():
    from pipeline.data import DataError
    from pipeline.errors import UserError
    from pipeline.stages.ppo import endless_batches

    with pytest.raises(DataError) as err:
        next(endless_batches(list(range(3)), 4, list, seed=0))
    assert isinstance(err.value, UserError)
    assert str(err.value).startswith("data_blend.ptx_path: 3 text blocks are fewer than one PTX batch of 4 x 1 ranks; ")

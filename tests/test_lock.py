"""One run per run folder (pipeline/lock.py): a second run into a held folder stops at once with
the holder named and writes nothing; stale locks of dead runs are taken over; the lock goes away
after every kind of exit. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from pipeline.lock import (
    LOCK_NAME,
    STALE_AFTER_S,
    TOKEN_ENV,
    Holder,
    RunFolderInUse,
    RunLock,
    stale_reason,
    wait_for_rank0,
)

SFT = ["+experiment=demo", "run.stages=[sft]", "stage.sft.per_device_train_batch_size=8"]


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def start_cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def train_rows(out: Path) -> list[int]:
    metrics = out / "sft" / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [row["step"] for row in map(json.loads, metrics.read_text().splitlines()) if row["split"] == "train"]


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run (size, mtime) but Hydra's own record of the last command, .hydra/,
    which Hydra writes before any code of ours runs."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")
            if p.is_file() and p.relative_to(out).parts[0] != ".hydra"}


HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.lock import RunLock
    with RunLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def single_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- two runs into one folder


def test_a_second_run_into_a_held_folder_stops_at_once_and_writes_nothing(tmp_path: Path):
    """The second run (another seed) is refused with the holder named while the first trains; the
    first then gets SIGTERM: it saves a checkpoint, exits 75 and leaves no lock."""
    out = tmp_path / "run"
    long_sft = [*SFT, "stage.sft.max_steps=400", "stage.sft.num_train_epochs=100"]
    first = start_cli(*long_sft, f"run.output_dir={out}")
    try:
        wait_for(lambda: len(train_rows(out)) >= 1, "the first run's first train step", first)
        first.send_signal(signal.SIGSTOP)  # holds the folder, mid-training, while the second starts
        before = snapshot(out)
        config = (out / "config.yaml").read_text()
        started = time.time()
        second = run_cli(*long_sft, "run.seed=7", f"run.output_dir={out}")
        took = time.time() - started
        assert snapshot(out) == before  # not a byte written by the second run
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 75, stdout[-3000:] + stderr[-3000:]

    assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
    line = single_error_line(second.stderr)
    assert line.startswith(f"error: run.output_dir={out}: another run is using this folder ")
    assert f"host {socket.gethostname()}, pid {first.pid}, since " in line
    assert "python -m pipeline +experiment=demo" in line and "stage.sft.max_steps=400" in line
    assert "[sft]" not in second.stdout and "data for sft" not in second.stdout  # stopped before any work
    assert took < 60, took
    assert (out / "config.yaml").read_text() == config and "seed: 7" not in config
    rows = train_rows(out)
    assert rows == list(range(1, len(rows) + 1))  # one run's rows, each step once
    assert list((out / "sft" / "checkpoints").glob("step_*"))  # the SIGTERM checkpoint
    assert not (out / LOCK_NAME).exists()  # released after SIGTERM


def test_a_relaunching_run_refuses_a_held_folder_before_starting_any_rank(tmp_path: Path):
    out = tmp_path / "run"
    holder = hold_in_another_process(out)
    try:
        proc = run_cli(*SFT, "+deployment=single_node", "deployment.procs_per_node=2", f"run.output_dir={out}")
    finally:
        holder.terminate()
        holder.wait(timeout=60)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"pid {holder.pid}" in single_error_line(proc.stderr)
    assert "launching" not in proc.stdout
    assert holder.returncode == 75 and not (out / LOCK_NAME).exists()  # SIGTERM released it too


def test_rank0_of_a_launched_run_uses_its_launchers_lock_and_other_ranks_take_none(tmp_path: Path, monkeypatch):
    from pipeline.cli import folder_held_by_rank0

    out = tmp_path / "run"
    with RunLock(out) as parent:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv(TOKEN_ENV, parent.token)
        with folder_held_by_rank0(out):  # recognises its parent's token: no second lock, no refusal
            assert json.loads((out / LOCK_NAME).read_text())["token"] == parent.token
        assert (out / LOCK_NAME).exists()  # still the parent's
        monkeypatch.setenv(TOKEN_ENV, "another-runs-token")
        with pytest.raises(RunFolderInUse, match=f"pid {os.getpid()}"):
            with folder_held_by_rank0(out):
                pass
        monkeypatch.setenv("RANK", "1")
        with folder_held_by_rank0(out):  # other ranks never lock
            pass
    assert not (out / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(TOKEN_ENV)
    with folder_held_by_rank0(out):  # no launching process (a SLURM job step): rank 0 takes it
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_other_ranks_of_a_slurm_job_step_wait_for_rank0_and_stop_on_another_run(tmp_path: Path):
    """SLURM starts every rank (no launching process): rank 0 takes the lock; the others must not
    start while another job's run holds the folder (rank 0 stops on it, and they would wait for it at
    the rendezvous until torch's timeout)."""
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    step = {"SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}
    lock.write_text(json.dumps(holder(host="n1", slurm_job="40", slurm_step="0").__dict__))
    with pytest.raises(RunFolderInUse, match="host n1, pid"):
        wait_for_rank0(out, step, timeout=5)
    lock.write_text(json.dumps(holder(host="n1", slurm_job="41", slurm_step="0").__dict__))
    started = time.time()
    wait_for_rank0(out, step, timeout=30)  # rank 0 of this step holds it
    assert time.time() - started < 5
    lock.unlink()
    started = time.time()
    wait_for_rank0(out, step, timeout=2)  # rank 0 not there yet: go on after the timeout
    assert 2 <= time.time() - started < 10


# ---------------------------------------------------------------- stale locks


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path):
    out = tmp_path / "run"
    dead = hold_in_another_process(out)
    dead.kill()  # SIGKILL: no chance to release
    dead.wait(timeout=60)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead.pid
    proc = run_cli(*SFT, "stage.sft.max_steps=2", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"warning: run.output_dir={out}: taking over the lock of a run that is gone (its process is gone; "
            f"host {socket.gethostname()}, pid {dead.pid}, since ") in proc.stderr
    assert train_rows(out) == [1, 2] and not (out / LOCK_NAME).exists()  # released after a normal exit


def holder(**fields) -> Holder:
    base = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time() - 10, command="python -m pipeline",
                token="t")
    return Holder(**{**base, **fields})


def test_which_locks_are_stale():
    assert stale_reason(holder(), age=10) is None  # this very process
    import psutil

    reused = holder(started=psutil.Process().create_time() - 3600)  # this pid, but its process started later
    assert stale_reason(reused, age=10) == "its process is gone"
    other = holder(host="node-that-is-not-here")
    assert stale_reason(other, age=STALE_AFTER_S / 2) is None  # its heartbeat is recent
    assert stale_reason(other, age=STALE_AFTER_S + 60) == f"no heartbeat for {(STALE_AFTER_S + 60) / 60:.0f} min"
    requeued = holder(host="n1", slurm_job="77", slurm_restart=0)
    assert stale_reason(requeued, 10, {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}) == "SLURM job 77 before its requeue"
    assert stale_reason(requeued, 10, {"SLURM_JOB_ID": "77"}) is None  # the same incarnation: another step of it
    assert stale_reason(None, age=5) is None  # being written
    assert stale_reason(None, age=STALE_AFTER_S + 1) is not None


def test_a_lock_on_another_host_is_refused_until_its_heartbeat_stops(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps(holder(host="gpu-node-7", pid=1).__dict__))
    with pytest.raises(RunFolderInUse, match="host gpu-node-7, pid 1, since "):
        RunLock(out).acquire()
    os.utime(lock, (time.time() - STALE_AFTER_S - 5,) * 2)
    with RunLock(out) as mine:
        assert json.loads(lock.read_text())["token"] == mine.token
    assert not lock.exists()


# ---------------------------------------------------------------- release after an error, the heartbeat


def test_released_after_an_error_exit(tmp_path: Path):
    out, data = tmp_path / "run", tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "x",\n')
    proc = run_cli("+experiment=demo", "data_blend=local", f"data_blend.path={data}", "run.stages=[sft]",
                   f"run.output_dir={out}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert single_error_line(proc.stderr).startswith(f"error: {data}:2: ")
    assert (out / "config.yaml").exists() and not (out / LOCK_NAME).exists()  # failed inside the run, released


def test_the_heartbeat_refreshes_the_lock_and_notices_a_takeover(tmp_path: Path, monkeypatch, capsys):
    import pipeline.lock as lock_module

    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    with RunLock(out) as lock:
        os.utime(lock.path, (time.time() - 1000,) * 2)
        wait_for(lambda: time.time() - lock.path.stat().st_mtime < 10, "a heartbeat", timeout=10)
        lock.path.write_text(json.dumps(holder(token="someone-else").__dict__))
        wait_for(lambda: "no longer holds the folder" in capsys.readouterr().err, "the takeover warning", timeout=10)
    assert lock.path.exists()  # the other holder's lock stays

"""One run per run folder: an exclusive lock, `<run>/.lock`, held for the whole run.

Two runs writing into one folder corrupt each other (the metrics of both in one file, one resuming
the other's checkpoint, a manifest over weights of another config). So the process that starts a
run creates `<run>/.lock` with O_CREAT | O_EXCL, which is atomic on local file systems and on NFS
v3 and later, so it also holds across the nodes of a shared file system. The file says who holds
it (host, pid, start time, command, a token). A second run finds it and stops before writing
anything, with one line naming the folder and the holder. The holder removes it when the run ends:
normally, on an error, or on a signal (SIGTERM / SIGINT end in SystemExit / KeyboardInterrupt).

A holder that died without removing it (SIGKILL, a lost node) leaves a stale lock, which the next
run takes over with a warning:
- on the same host: its process is gone (no such pid, a zombie, or a newer process with its pid);
- on another host: its heartbeat stopped. The holder touches the file every HEARTBEAT_S from a
  thread; a lock untouched for STALE_AFTER_S is stale;
- in the same SLURM job after a requeue: SLURM starts a job again only once all its processes ended.

Runs with several processes: the launching process holds the lock and hands its token to the ranks
in TOKEN_ENV (a PIPELINE_* variable, which the launchers forward to every node); rank 0 checks that
the folder is held with it (`held_with`). Without a launching process (a SLURM job step of one
task per rank) rank 0 takes it, and the other ranks wait until it holds it (`wait_for_rank0`).
See pipeline/cli.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import RESUMABLE_EXIT_CODE, UserError

LOCK_NAME = ".lock"
TOKEN_ENV = "PIPELINE_RUN_LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunFolderInUse(UserError):
    pass


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # seconds since the epoch
    command: str
    token: str
    slurm_job: str | None = None
    slurm_step: str | None = None
    slurm_restart: int = 0

    def __str__(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        command = self.command if len(self.command) <= 200 else self.command[:197] + "..."
        return f"host {self.host}, pid {self.pid}, since {since}: {command}"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `python -m pipeline ARGS` (argv[0] is then pipeline/__main__.py)."""
    argv = sys.argv if argv is None else argv
    if Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "pipeline":
        return shlex.join(["python", "-m", "pipeline", *argv[1:]])
    return shlex.join(argv)


def this_process(token: str) -> Holder:
    return Holder(host=socket.gethostname(), pid=os.getpid(), started=time.time(), command=command_line(),
                  token=token, slurm_job=os.environ.get("SLURM_JOB_ID"), slurm_step=os.environ.get("SLURM_STEP_ID"),
                  slurm_restart=int(os.environ.get("SLURM_RESTART_COUNT") or 0))


def read_lock(path: Path) -> tuple[Holder | None, str, float]:
    """(holder, the file's text, seconds since it was last touched); holder None when the text is
    not a holder (its writer is between creating and writing it, or it is garbage).
    FileNotFoundError when there is no lock."""
    for _ in range(20):
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
        try:
            return Holder(**json.loads(text)), text, age
        except (ValueError, TypeError):
            time.sleep(0.05)  # created but not written yet: give its writer a moment
    return None, text, age


def process_alive(pid: int, started: float) -> bool:
    """Whether the process `pid` on this host is the one that started at `started`."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's process: it exists
        return True


def stale_reason(holder: Holder | None, age: float, env: os._Environ | dict = os.environ) -> str | None:
    """Why the lock of `holder` (untouched for `age` seconds) belongs to a run that is gone; None
    while it may still run."""
    if holder is None:
        return f"an unreadable lock untouched for {age / 60:.0f} min" if age > STALE_AFTER_S else None
    restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    if holder.slurm_job and holder.slurm_job == env.get("SLURM_JOB_ID") and holder.slurm_restart < restart:
        return f"SLURM job {holder.slurm_job} before its requeue"
    if holder.host == socket.gethostname():
        return None if process_alive(holder.pid, holder.started) else "its process is gone"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age / 60:.0f} min"
    return None


def in_use_message(run_dir: Path, holder: Holder | None) -> str:
    who = holder or "a run whose lock file is not written yet"
    return (f"run.output_dir={run_dir}: another run is using this folder ({who}); wait for it to end or stop it, "
            f"or set another run.output_dir (a run that died leaves a lock the next run takes over)")


def _remove_stale(path: Path, seen: str) -> None:
    """Remove the stale lock whose text was `seen`, unless another run replaced it meanwhile. Runs
    that found the same stale lock take turns through a guard file, so that none of them removes
    the fresh lock of another."""
    guard = path.with_name(LOCK_NAME + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > 60:
                guard.unlink()  # left by a run that died within these few lines
        except FileNotFoundError:
            pass
        time.sleep(0.1)
        return
    try:
        if path.read_text() == seen:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def held_with(run_dir: Path, token: str) -> bool:
    """Whether run_dir's lock is held with `token` (rank 0 of a launched run: by its launching process)."""
    try:
        holder, _, _ = read_lock(Path(run_dir) / LOCK_NAME)
    except FileNotFoundError:
        return False
    return holder is not None and holder.token == token


def wait_for_rank0(run_dir: Path, env: os._Environ | dict = os.environ, timeout: float = 120.0) -> None:
    """The other ranks of a SLURM job step, whose rank 0 takes the lock: stop with RunFolderInUse
    when a live run of another job step holds the folder (rank 0 stops on it too, and they would
    wait for it at the rendezvous until torch's timeout); go on once rank 0 holds it, or after
    `timeout` seconds without a verdict."""
    path = Path(run_dir) / LOCK_NAME
    ours = (env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID"))
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            holder, _, age = read_lock(path)
        except FileNotFoundError:
            holder = None
        if holder is not None:
            if (holder.slurm_job, holder.slurm_step) == ours:
                return
            if stale_reason(holder, age, env) is None:
                raise RunFolderInUse(in_use_message(Path(run_dir), holder))
        time.sleep(1.0)


def _stop_on_sigterm(signum, _frame):
    raise SystemExit(RESUMABLE_EXIT_CODE)  # unwinds through RunLock.__exit__; nothing had started


class RunLock:
    """`with RunLock(run_dir) as lock:` holds `<run_dir>/.lock` (creating run_dir), or raises
    RunFolderInUse naming the holder. `lock.token` identifies this holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._previous_sigterm = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = json.dumps(asdict(this_process(self.token)), indent=1) + "\n"
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    holder, seen, age = read_lock(self.path)
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                reason = stale_reason(holder, age)
                if reason is None:
                    raise RunFolderInUse(in_use_message(self.run_dir, holder)) from None
                print(f"warning: run.output_dir={self.run_dir}: taking over the lock of a run that is gone ({reason}; "
                      f"{holder or 'no holder recorded'})", file=sys.stderr, flush=True)
                _remove_stale(self.path, seen)
                continue
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(record)
                    fh.flush()
                    os.fsync(fh.fileno())
            except BaseException:
                self.path.unlink(missing_ok=True)  # a full disk: leave no empty lock behind
                raise
            self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._heartbeat.start()
            return self
        holder, _, _ = read_lock(self.path)  # other runs kept taking it first
        raise RunFolderInUse(in_use_message(self.run_dir, holder))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if held_with(self.run_dir, self.token):
                    os.utime(self.path)
                    continue
                problem = "its lock file was removed or taken over"
            except OSError as err:
                problem = f"the lock file cannot be refreshed: {err}"
            print(f"warning: run.output_dir={self.run_dir}: this run no longer holds the folder ({problem}); "
                  "another run may start writing into it", file=sys.stderr, flush=True)
            return

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if held_with(self.run_dir, self.token):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            # Until the run installs its own handler (checkpoint, then exit 75), SIGTERM would end
            # the process without releasing the lock.
            self._previous_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self.release()

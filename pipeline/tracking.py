"""Per-stage metrics: `metrics.jsonl` (one JSON object per line), echoed to the console, a
progress bar with ETA on terminals, and optional wandb / tensorboard loggers (run.loggers).

    logger = MetricsLogger(stage_dir, "sft", is_main, log_interval)
    logger.begin(total_steps, start_step)        # the bar starts here
    logger.log(step, "train", loss=...)          # a row; advances the bar
    logger.log(step, "eval", loss=...)           # always echoed

metrics.jsonl is the record; wandb and tensorboard get the same numbers:
  wandb        one run per pipeline run, keys "<stage>/<split>/<metric>" over "<stage>/step";
               files under <run>/wandb/. Offline (synced later with `wandb sync`) when there is no
               API key or the server cannot be reached; WANDB_MODE, when set, wins.
  tensorboard  <run>/tensorboard/<stage>/, tags "<split>/<metric>".
Which loggers: the `loggers` argument, else run.loggers in <run>/config.yaml (written by the runner).

Progress bars (`progress()`, and the bar inside MetricsLogger) show only on rank 0 and when
stderr is a terminal; PIPELINE_PROGRESS=1 forces them on, PIPELINE_PROGRESS=0 off.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write

LOGGERS = ("wandb", "tensorboard")


# --------------------------------------------------------------------------- progress bars


def _rank() -> int:
    """This process's rank, from the launcher's RANK before the process group exists."""
    from pipeline import dist

    return dist.rank() if dist.initialized() else int(os.environ.get("RANK", "0") or 0)


def progress_enabled(is_main: bool | None = None, stream=None) -> bool:
    """Bars on rank 0 only, on a terminal only (PIPELINE_PROGRESS=1/0 forces on/off)."""
    if is_main is None:
        is_main = _rank() == 0
    if not is_main:
        return False
    env = os.environ.get("PIPELINE_PROGRESS", "auto").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "it", is_main: bool | None = None, **kwargs):
    """A tqdm bar with ETA around `iterable` (or a manual one: `total=`, then `.update(n)`).

    Disabled (a silent pass-through) on non-zero ranks and when stderr is not a terminal.
    """
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress_enabled(is_main),
                dynamic_ncols=True, file=sys.stderr, **kwargs)


# --------------------------------------------------------------------------- external loggers


def wandb_mode(timeout: float = 2.0) -> str:
    """online when a key exists and the server answers; offline otherwise; WANDB_MODE wins."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_OFFLINE", "").lower() in ("1", "true"):
        return "offline"
    if not _wandb_key():
        return "offline"
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout).close()
    except OSError:
        return "offline"
    return "online"


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return os.path.exists(path) and netrc.netrc(path).authenticators(host) is not None
    except Exception:
        return False


class _WandbSink:
    """One wandb run for a whole pipeline run; each stage steps along its own "<stage>/step"."""

    def __init__(self, run_dir: Path, config: dict | None, name: str):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "wandb").mkdir(exist_ok=True)
        mode = wandb_mode()
        kwargs = dict(project=os.environ.get("WANDB_PROJECT", "rlhf-pipeline"), name=name, dir=str(run_dir),
                      config=config or {}, reinit="create_new",
                      settings=wandb.Settings(init_timeout=60, silent=True, console="off"))
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as err:
            if mode != "online":
                raise
            print(f"warning: wandb online init failed ({type(err).__name__}); logging offline", file=sys.stderr)
            self.run = wandb.init(mode="offline", **kwargs)
        self.mode = mode
        self.stages: set[str] = set()

    def log(self, stage: str, step: int, split: str, metrics: dict[str, float]) -> None:
        if stage not in self.stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{split}/{k}": v for k, v in metrics.items()}})

    def close(self) -> None:
        self.run.finish()


class _TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, stage: str, step: int, split: str, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_SINKS: dict[tuple[str, str], Any] = {}


def _sink(kind: str, run_dir: Path, stage: str, config: dict | None, name: str):
    key = (kind, str((run_dir / stage) if kind == "tensorboard" else run_dir))
    if key not in _SINKS:
        try:
            _SINKS[key] = (_WandbSink(run_dir, config, name) if kind == "wandb"
                           else _TensorBoardSink(run_dir / "tensorboard" / stage))
        except Exception as err:
            print(f"warning: run.loggers: {kind} is off ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                  file=sys.stderr, flush=True)
            _SINKS[key] = None
    return _SINKS[key]


def finish_loggers() -> None:
    """Close every wandb run and tensorboard writer opened in this process (also done at exit)."""
    while _SINKS:
        _, sink = _SINKS.popitem()
        if sink is not None:
            try:
                sink.close()
            except Exception as err:
                print(f"warning: closing a logger failed: {err}", file=sys.stderr)


atexit.register(finish_loggers)


def _run_settings(run_dir: Path) -> tuple[list[str], dict | None, str]:
    """run.loggers, the whole config and the run name from <run>/config.yaml (none without one)."""
    from omegaconf import OmegaConf

    from pipeline.config import ConfigError, load_run_config

    if not (run_dir / "config.yaml").exists():
        return [], None, run_dir.name
    try:
        cfg = load_run_config(run_dir)
    except ConfigError as err:
        print(f"warning: loggers off: {err}", file=sys.stderr)
        return [], None, run_dir.name
    return list(cfg.run.loggers), OmegaConf.to_container(OmegaConf.structured(cfg)), cfg.run.name


# --------------------------------------------------------------------------- the logger


class MetricsLogger:
    """Rank 0 appends {"step", "split", ...metrics} to <stage_dir>/metrics.jsonl.

    `loggers` (any of wandb, tensorboard) and `config` (logged to wandb) default to run.loggers
    and the config in <stage_dir>/../config.yaml. `run_dir` defaults to stage_dir's parent.
    """

    def __init__(self, stage_dir: Path, stage: str, is_main: bool, log_interval: int = 10,
                 loggers: list[str] | None = None, config: dict | None = None, run_dir: Path | None = None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.stage, self.is_main, self.log_interval = stage, is_main, max(1, int(log_interval))
        self.start = time.time()
        self.total_steps, self.start_step = 0, 0
        self.bar = None
        self.run_dir = Path(run_dir) if run_dir is not None else Path(stage_dir).parent
        self.loggers: list[str] = []
        self._config, self._name = config, self.run_dir.name
        if is_main:
            if loggers is None:
                loggers, file_config, self._name = _run_settings(self.run_dir)
                self._config = config if config is not None else file_config
            unknown = [x for x in loggers if x not in LOGGERS]
            if unknown:
                warnings.warn(f"run.loggers: unknown logger(s) {unknown}; known: {list(LOGGERS)}", stacklevel=2)
            self.loggers = [x for x in loggers if x in LOGGERS]

    def begin(self, total_steps: int, start_step: int = 0) -> None:
        """Called once the step budget is known (and after a resume); starts the progress bar."""
        self.total_steps, self.start_step = total_steps, start_step
        self._close_bar()
        if progress_enabled(self.is_main) and total_steps > start_step:
            self.bar = progress(total=total_steps, desc=f"[{self.stage}]", unit="step", initial=start_step,
                                is_main=self.is_main)

    def log(self, step: int, split: str, echo: bool | None = None, **metrics: float) -> None:
        if not self.is_main:
            return
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.bar is not None:
            # With a bar, train rows print every log_interval-th step only; eval rows always.
            show = split != "train" or step % self.log_interval == 0
        else:
            show = echo if echo is not None else (split != "train" or step % self.log_interval == 0)
        if show:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("step", "split"))
            self._print(f"[{self.stage}] {split} step {step}  {shown}")
        if self.bar is not None and split == "train":
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            brief = {k: _fmt(row[k]) for k in ("loss", "reward", "accuracy", "kl") if k in row}
            if brief:
                self.bar.set_postfix(brief, refresh=False)
            if step >= self.total_steps:
                self._close_bar()
        self._forward(step, split, row)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (metrics written after the checkpoint a resume starts from)."""
        if not self.is_main or not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        """Close the bar (the wandb run and tensorboard writers close with finish_loggers / at exit)."""
        self._close_bar()

    # ---- internals
    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _forward(self, step: int, split: str, row: dict) -> None:
        numbers = {k: float(v) for k, v in row.items()
                   if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numbers:
            return
        for kind in self.loggers:
            sink = _sink(kind, self.run_dir, self.stage, self._config, self._name)
            if sink is not None:
                try:
                    sink.log(self.stage, step, split, numbers)
                except Exception as err:
                    print(f"warning: {kind} logging failed ({err}); turning it off", file=sys.stderr, flush=True)
                    self.loggers = [x for x in self.loggers if x != kind]


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)

"""Per-stage metrics: `metrics.jsonl` (one JSON object per line), echoed to the console."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Rank 0 appends {"step", "split", ...metrics} to <stage_dir>/metrics.jsonl."""

    def __init__(self, stage_dir: Path, stage: str, is_main: bool, log_interval: int = 10):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.stage, self.is_main, self.log_interval = stage, is_main, log_interval
        self.start = time.time()

    def begin(self, total_steps: int, start_step: int = 0) -> None:
        """Called once the step budget is known (and after a resume)."""
        self.total_steps, self.start_step = total_steps, start_step

    def log(self, step: int, split: str, echo: bool | None = None, **metrics: float) -> None:
        if not self.is_main:
            return
        row = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if echo if echo is not None else (split != "train" or step % self.log_interval == 0):
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("step", "split"))
            print(f"[{self.stage}] {split} step {step}  {shown}", flush=True)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (metrics written after the checkpoint a resume starts from)."""
        if not self.is_main or not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


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

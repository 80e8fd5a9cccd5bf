"""Shared fixtures and helpers: paths to the real data beside the project, a tiny demo run, the CLI in a
subprocess, config dicts built from a test module's base config, a recorder of ZeRO-3 gathers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a subprocess, as a user runs it."""
    # This Python's bin first on PATH, as an activated venv has it: DeepSpeed rebuilds its CPU ops
    # whenever processes alternate between two ninja binaries.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def merge(a: dict, b: dict) -> dict:
    """`a` with `b`'s keys laid over it, nested dicts merged key by key (neither is changed)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def stage_config(base: dict, out: Path, stages: list[str], stage: str, settings: dict) -> dict:
    """`base` run into `out` with run.stages=`stages` and `settings` laid over stage.<stage>."""
    return merge(base, {"run": {"output_dir": str(out), "stages": stages}, "stage": {stage: settings}})


def record_gathers(monkeypatch) -> list[int]:
    """The parameter count of every deepspeed.zero.GatheredParameters call from here to the test's end,
    in order (to check that a save gathers one module at a time)."""
    import deepspeed

    sizes: list[int] = []
    real = deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        sizes.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    return sizes


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One full demo run (all three stages) shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = run_cli("+experiment=demo", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out

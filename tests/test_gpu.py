"""GPU checks (marker `gpu`, deselected by default; run with `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY_CUDA = ["+experiment=demo", "hardware=h200-141g", "run.device=cuda", "run.dtype=bf16",
             "stage.sft.max_steps=5", "stage.rm.max_steps=5", "stage.ppo.max_steps=3"]


def test_every_stage_on_cuda_in_bf16(tmp_path: Path):
    out = tmp_path / "run"
    proc = run_cli(*TINY_CUDA, f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["ppo"]["steps"] == 3
    assert (out / "ppo" / "final" / "actor" / "config.json").exists()

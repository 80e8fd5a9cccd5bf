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


def test_offloaded_frozen_models_and_fp32_ema_on_cuda(tmp_path: Path):
    """Reference and reward models as ZeRO-3 engines with CUDA parameter offload next to a plain
    ZeRO-0 actor and critic; the fp32 EMA (in host RAM with the reference model) saved in bf16."""
    out = tmp_path / "run"
    proc = run_cli(*TINY_CUDA, f"run.output_dir={out}", "stage.ppo.actor.strategy.zero_stage=0",
                   "stage.ppo.critic.strategy.zero_stage=0", "stage.ppo.offload_reference_model=true",
                   "stage.ppo.offload_reward_model=true", "stage.ppo.enable_ema=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["ppo"]["steps"] == 3
    roles = {r["role"]: r for r in json.loads((out / "plan.json").read_text())["stages"]["ppo"]["roles"]}
    assert roles["ref"]["offload"] and roles["reward"]["offload"] and roles["ema"]["offload"]
    ema_config = json.loads((out / "ppo" / "final" / "actor_ema" / "config.json").read_text())
    assert ema_config.get("dtype", ema_config.get("torch_dtype")) == "bfloat16"

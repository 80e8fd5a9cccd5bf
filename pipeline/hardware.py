"""Hardware profiles: facts about one device (memory, bf16, peak FLOP/s, bandwidth), never strategy.

Profiles live in `conf/hardware/<name>.yaml`; `hardware=auto` is resolved at start-up by
`detect_hardware()`, which returns a dict with `HardwareSection`'s keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline import CONF_DIR as PACKAGE_CONF_DIR

CONF_DIR = PACKAGE_CONF_DIR / "hardware"

# Substring of torch's device name -> profile file; checked in order (first match wins).
# Memory decides between the 40G and 80G A100, so it is matched separately.
_KNOWN_GPUS = [
    ("H200", "h200-141g"),
    ("H100", "h100-80g"),
    ("A6000", "a6000-48g"),
    ("V100", "v100-32g"),
]

# Dense bf16/fp16 tensor-core TFLOP/s per SM by compute capability, for GPUs without a profile.
_TFLOPS_PER_SM = {(7, 0): 1.56, (7, 5): 1.6, (8, 0): 2.89, (8, 6): 1.84, (8, 9): 1.4, (9, 0): 7.5}


def profile_names() -> list[str]:
    """Names of the concrete profiles under conf/hardware (auto excluded)."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "auto")


def load_profile(name: str) -> dict[str, Any]:
    """A profile YAML as a plain dict with HardwareSection's keys."""
    from omegaconf import OmegaConf

    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"hardware={name}: no {path}; choose from {profile_names() + ['auto']}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:  # pragma: no cover
        return 16.0


def _cpu_profile() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    return {
        "name": "auto:cpu",
        "device": "cpu",
        "memory_gib": round(_ram_gib(), 1),
        "bf16": False,
        "fp16": False,
        # ~50 GFLOP/s fp32 per core (AVX2/AVX-512 FMA at realistic clocks); a rough fact, not a promise.
        "peak_tflops": round(0.05 * cores, 3),
        "bandwidth_gbps": 20.0,
        "devices_per_node": 1,
        "host_memory_gib": round(_ram_gib(), 1),
    }


def gpu_profile(name: str, total_bytes: int, major: int, minor: int, sm_count: int, count: int) -> dict[str, Any]:
    """Profile for a GPU from torch's device properties (separate from torch so it is testable)."""
    mem_gib = total_bytes / 2**30
    known = None
    if "A100" in name:
        known = "a100-80g" if mem_gib > 60 else "a100-40g"
    else:
        for key, prof in _KNOWN_GPUS:
            if key in name:
                known = prof
                break
    if known is not None:
        facts = load_profile(known)
    else:
        facts = {
            "peak_tflops": round(_TFLOPS_PER_SM.get((major, minor), 1.5) * sm_count, 1),
            # Unknown memory system: assume a mid-range HBM figure.
            "bandwidth_gbps": 1000.0,
        }
    facts.update({
        "name": f"auto:{name}",
        "device": "cuda",
        "memory_gib": round(mem_gib, 1),
        "bf16": major >= 8,
        "fp16": True,
        "devices_per_node": max(1, count),
        "host_memory_gib": round(_ram_gib(), 1),
    })
    return facts


def detect_hardware() -> dict[str, Any]:
    """Describe the local device with HardwareSection's keys (name "auto:<GPU name>" or "auto:cpu")."""
    # No NVIDIA device node: skip importing torch (seconds) and describe the CPU.
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return _cpu_profile()
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return gpu_profile(p.name, p.total_memory, p.major, p.minor, p.multi_processor_count,
                               torch.cuda.device_count())
    except Exception:
        pass
    return _cpu_profile()

"""The process group and every collective the pipeline makes, in one place.

Each helper works alone too (no process group: rank 0 of 1, collectives return their input), so
stages, tests and API users call them unconditionally. Decisions all ranks must share (skip a
step, save a checkpoint, stop) go through `any_rank`; metrics through `all_reduce_mean`.

Tensor parallelism (degree tp): the ranks of one tensor-parallel group are tp consecutive ranks (as
DeepSpeed's (data, tensor) device mesh puts them: tensor innermost) and see the same data, so data is
split by `dp_rank(tp)` over `dp_world_size(tp)`. Metrics averaged over every rank stay right (the
ranks of a group hold equal copies with equal weights); `gather_rows` takes one copy per group.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def dp_rank(tp: int = 1) -> int:
    """This rank's data-parallel rank: its tensor-parallel group's index (= DeepSpeed's
    groups.get_data_parallel_rank() once a TP engine exists)."""
    return rank() // tp


def dp_world_size(tp: int = 1) -> int:
    """Data-parallel replicas: world / tp (= DeepSpeed's groups.get_data_parallel_world_size())."""
    return world_size() // tp


def barrier() -> None:
    if initialized():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type(cfg) -> str:
    """cpu or cuda: run.device, or with auto the hardware profile's device when CUDA is here."""
    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() and cfg.hardware.device == "cuda" else "cpu"
    return cfg.run.device


def init_distributed(cfg) -> None:
    """Join (or, alone, create) the process group: gloo on CPU, nccl on CUDA."""
    if device_type(cfg) == "cpu":  # spares DeepSpeed's accelerator probe and its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if initialized():
        return
    backend = "nccl" if device_type(cfg) == "cuda" else "gloo"
    if "RANK" not in os.environ:
        # Alone: a private one-process group. Nothing goes into os.environ, so processes this one
        # starts (tests, sweeps, launchers) do not inherit a port it holds.
        port = cfg.deployment.master_port or free_port()
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it; harmless to inherit
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts an existing group
    if device_type(cfg) == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def collective_device() -> torch.device:
    """Where the small tensors of a collective (flags, metric sums) must live: NCCL reduces CUDA
    tensors only, gloo CPU ones."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a decision all ranks must share)."""
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(values: list[float], weight: float) -> list[float]:
    """Weighted mean of per-rank values across ranks (weight = examples this rank saw)."""
    t = torch.tensor([v * weight for v in values] + [weight], dtype=torch.float64, device=collective_device())
    if world_size() > 1:
        dist.all_reduce(t)
    return [float(x) / max(float(t[-1]), 1e-12) for x in t[:-1]]


def gather_rows(t: torch.Tensor, tp: int = 1) -> torch.Tensor:
    """Concatenate every data-parallel replica's (B, ...) tensor: (world / tp * B, ...), one copy per
    tensor-parallel group (its first rank's); the tensor itself on one rank."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts[::tp])

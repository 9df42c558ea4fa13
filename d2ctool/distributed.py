"""Data-parallel plumbing: rank detection from torchrun's environment, process group, barriers.

One process by default; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) the same command runs
data-parallel with `nccl` on GPU and `gloo` on CPU. Only rank 0 writes shared files.
"""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device_name: str | None = None):
    """Start the process group when under torchrun; return (rank, world, torch.device)."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if device_name:
        device = torch.device(device_name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels many times slower as weights shrink
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel plumbing: rank detection from torchrun's environment, process group, barriers.

One process by default; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) the same command runs
data-parallel with `nccl` on GPU and `gloo` on CPU. Only rank 0 writes shared files.

When one rank stops on an error, the others find out at their next collective, as a broken connection.
So the failing rank leaves its one-line message in the process group's store (`report_failure`), and the
others, when a collective breaks, end with that message (`peer_failure`) instead of a gloo/NCCL traceback.
"""

from __future__ import annotations

import os


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_device(name: str, key: str) -> str:
    """`cpu` or `cuda:N` with N a present GPU; anything else is a UserError naming the recipe key."""
    import re

    from d2ctool.errors import UserError

    if name == "cpu":
        return name
    found = re.fullmatch(r"cuda:(\d+)", name)
    if not found:
        hint = " (give the GPU index: cuda:0, cuda:1, ...)" if name == "cuda" else ""
        raise UserError(f"{key}: {name!r} is not a device; use cpu or cuda:N{hint}, or leave it unset for the "
                        "local GPU under torchrun, else cuda:0 if present, else cpu")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(found.group(1)) >= count:
        raise UserError(f"{key}: {name} requested, but this machine has {count} CUDA device(s)"
                        + ("; use cpu" if count == 0 else f"; use cuda:0..cuda:{count - 1}"))
    return name


def init(device_name: str | None = None):
    """Start the process group when under torchrun; return (rank, world, torch.device)."""
    import torch
    import torch.distributed as dist

    rank, world = rank_and_world()
    if device_name:
        device = torch.device(check_device(device_name, "device"))
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


def most_over_ranks(value: int, device) -> int:
    """The largest `value` any rank holds (itself when not under torchrun). Every rank must call it."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    most = torch.tensor([value], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


FAILURE_KEY = "d2c/failure"


def _store():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store to share the message through: the others report a generic line
        return None


def report_failure(message: str) -> None:
    """Under torchrun: leave this rank's error where the other ranks look when their next collective breaks."""
    store = _store()
    if store is not None and rank_and_world()[1] > 1:
        try:
            store.set(FAILURE_KEY, message)
        except Exception:  # noqa: BLE001 - the store may be gone with its host rank: nothing more to do
            pass


_PEER_LOST = ("closed by peer", "connection reset", "broken pipe", "nccl", "gloo", "timed out", "timeout")


def peer_failure(error: BaseException) -> str | None:
    """The message another rank reported, when `error` is a collective broken by that rank stopping; a generic
    line when the message cannot be read but the error is a lost peer; None for anything else (a real bug)."""
    if rank_and_world()[1] <= 1:
        return None
    import torch.distributed as dist

    store = _store()
    if store is not None:
        try:
            if store.check([FAILURE_KEY]):
                return store.get(FAILURE_KEY).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the store went with its host
            pass
    lost = isinstance(error, getattr(dist, "DistError", ())) or any(w in str(error).lower() for w in _PEER_LOST)
    return "another rank stopped on an error (its message is in that rank's log)" if lost else None

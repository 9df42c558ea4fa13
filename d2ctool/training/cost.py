"""What one training step costs: FLOPs counted by `FlopCounterMode` and the activations autograd saves for
backward, traced through a model's real training loss (on the meta device: shapes only, no memory).

Each model states its own step through a `step_cost(batch)` method that calls `trace_step` on its loss;
`d2c plan` turns the result into memory, time and GPU-hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class StepCost:
    """One training step, per image."""

    forward_flops: float
    train_flops: float  # forward + backward
    activations: float  # bytes autograd saves for backward, fp32
    activations_checkpointed: float  # with gradient checkpointing of every block


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (members of every ModuleList): the units gradient checkpointing wraps."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def trace_step(model: nn.Module, step: Callable[[], torch.Tensor], batch: int) -> StepCost:
    """FLOPs and saved activations of `step()` (returns the loss) and its backward, per image."""
    params = {id(p) for p in model.parameters()}
    seen, keep = set(), []
    state = {"block": None, "total": 0, "inputs": 0}
    per_block: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in seen and id(base) not in params:
            seen.add(id(t))
            keep.append(t)  # ids stay unique while the tensor lives
            state["total"] += _nbytes(t)
            if state["block"] is not None:
                per_block[state["block"]] = per_block.get(state["block"], 0) + _nbytes(t)
        return t

    def enter(module, args):
        state["block"] = id(module)
        state["inputs"] += _nbytes(args[0])

    def leave(module, args, out):
        state["block"] = None

    hooks = [h for b in repeated_blocks(model)
             for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
            forward = counter.get_total_flops()
            loss.backward()
            total = counter.get_total_flops()
    finally:
        for h in hooks:
            h.remove()
    in_blocks = sum(per_block.values())
    checkpointed = state["total"] - in_blocks + state["inputs"] + max(per_block.values(), default=0)
    return StepCost(forward / batch, total / batch, state["total"] / batch, checkpointed / batch)

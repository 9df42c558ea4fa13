"""Random draws that follow an optional torch.Generator, wherever the tensors live.

With a generator, numbers are drawn on the generator's device and moved to `device`, so a CPU generator
gives the same samples on any device; without one, torch's default generator of `device` is used.
"""

from __future__ import annotations

import torch


def _where(device, generator):
    return generator.device if generator is not None else device


def rand(shape, device, generator=None) -> torch.Tensor:
    return torch.rand(shape, device=_where(device, generator), generator=generator).to(device)


def randn(shape, device, generator=None) -> torch.Tensor:
    return torch.randn(shape, device=_where(device, generator), generator=generator).to(device)


def randint(high: int, shape, device, generator=None) -> torch.Tensor:
    return torch.randint(0, high, shape, device=_where(device, generator), generator=generator).to(device)

"""Stage-1 generation: class labels -> VQ codes with a static KV cache (gpt-fast style), for GPT and RAR.

Prefill the class condition (`model.prefill`), then one code per step (`model.step`), in raster order.
Classifier-free guidance runs the conditional and unconditional (null class) halves in one batch and
mixes logits: uncond + scale·(cond − uncond), with the scale constant or scheduled over the steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from d2ctool.discrete.config import SamplingConfig
from d2ctool.discrete.model import GPT
from d2ctool.discrete.rar import RAR


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; the rest -> -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # mass before this token already exceeds top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def cfg_scale_at(step: int, num_steps: int, sampling: SamplingConfig) -> float:
    """The guidance scale when sampling code `step` of `num_steps`."""
    if sampling.cfg_schedule == "linear":  # 1 at the first code, cfg_scale at the last
        return 1.0 + (sampling.cfg_scale - 1.0) * step / max(num_steps - 1, 1)
    if sampling.cfg_schedule == "power-cosine":  # RAR's; power 0 gives (t/N)^0 = 1, i.e. constant cfg_scale
        ramp = (1.0 - math.cos(math.pi * (step / num_steps) ** sampling.cfg_power)) / 2
        return 1.0 + (sampling.cfg_scale - 1.0) * ramp
    return sampling.cfg_scale


@torch.no_grad()
def generate(model: GPT | RAR, labels: torch.Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes [B, grid*grid] (row-major) for class labels [B], from either stage-1 model (raster order)."""
    sampling = sampling.resolved()
    n = model.cfg.grid ** 2
    guided = sampling.cfg_scale > 1.0
    batch = len(labels)
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    model.setup_cache(len(cond))
    try:
        logits = model.prefill(cond)
        codes = torch.empty(batch, n, dtype=torch.long, device=labels.device)
        for i in range(n):
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale_at(i, n, sampling)
            codes[:, i] = sample_next(logits, sampling, generator)
            if i + 1 < n:
                logits = model.step(codes[:, i].repeat(2) if guided else codes[:, i], i)
        return codes
    finally:
        model.clear_cache()

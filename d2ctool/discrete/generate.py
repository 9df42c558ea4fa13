"""Stage-1 generation: class labels -> VQ codes with a static KV cache (gpt-fast style).

Prefill the class token, then one position per step. Classifier-free guidance runs the conditional
and unconditional (null class) halves in one batch and mixes logits: uncond + scale·(cond − uncond).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2ctool.discrete.config import SamplingConfig
from d2ctool.discrete.model import GPT


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


def cfg_scale_at(position: int, num_positions: int, sampling: SamplingConfig) -> float:
    if sampling.cfg_schedule == "linear":  # 1 at the first code, cfg_scale at the last
        return 1.0 + (sampling.cfg_scale - 1.0) * position / max(num_positions - 1, 1)
    return sampling.cfg_scale


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes [B, grid*grid] (row-major) for class labels [B]."""
    n = model.cfg.grid ** 2
    guided = sampling.cfg_scale > 1.0
    batch = len(labels)
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    model.setup_cache(len(cond))
    try:
        device = labels.device
        logits = model.forward_cached(None, cond, torch.tensor([0], device=device))[:, -1]
        codes = torch.empty(batch, n, dtype=torch.long, device=device)
        for i in range(n):
            if guided:
                cond_logits, uncond_logits = logits.chunk(2)
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale_at(i, n, sampling)
            codes[:, i] = sample_next(logits, sampling, generator)
            if i + 1 < n:
                tokens = codes[:, i:i + 1].repeat(2, 1) if guided else codes[:, i:i + 1]
                logits = model.forward_cached(tokens, None, torch.tensor([i + 1], device=device))[:, -1]
        return codes
    finally:
        model.clear_cache()

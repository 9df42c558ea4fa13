"""What both stage-1 models (GPT, RAR) are made of beyond their own layers: causal attention with a static
KV cache (gpt-fast's shape), the next-code loss, label dropout for classifier-free guidance, and the
training step that `d2c plan` costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2ctool.training.cost import StepCost, trace_step


class KVCache(nn.Module):
    """A static K/V store [B_max, H, T_max, D] for generation, owned by one attention layer."""

    def __init__(self, batch_size: int, n_head: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        shape = (batch_size, n_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] at sequence `positions` [T] (ascending); the keys and values of every
        position up to the last one written, [B, H, positions[-1] + 1, D]."""
        b = k.shape[0]
        self.k[:b, :, positions] = k.to(self.k.dtype)
        self.v[:b, :, positions] = v.to(self.v.dtype)
        end = int(positions[-1]) + 1
        return self.k[:b, :, :end], self.v[:b, :, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
                     positions: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """SDPA over q, k, v [B, H, T, D]: plain causal attention (positions None), or, with a KV cache, write
    k/v at `positions` and attend to every cached position up to each query's own."""
    if positions is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    keys, values = cache.update(positions, k, v)
    mask = positions[:, None] >= torch.arange(keys.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)


def drop_labels(labels: torch.Tensor, probability: float, null_class: int) -> torch.Tensor:
    """Replace a `probability` fraction of labels by the null class (training, for classifier-free guidance)."""
    drop = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def code_loss(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-code logits [B, N, vocab] against the codes [B, N] (GPT and RAR alike)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))


def code_step_cost(model: nn.Module, batch: int) -> StepCost:
    """One training step of a stage-1 model (`model.loss` on a batch of code grids), per image, traced on
    the model's device (the meta device for `d2c plan`)."""
    device = next(model.parameters()).device
    codes = torch.zeros(batch, model.cfg.grid**2, dtype=torch.long, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    return trace_step(model, lambda: model.loss(codes, labels), batch)

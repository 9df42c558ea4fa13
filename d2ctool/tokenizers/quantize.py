"""The nearest-code search every VQ tokenizer here uses (LlamaGen's normalises both sides first, MaskGIT's
does not): argmin over the codebook of |z|^2 + |e|^2 - 2 z.e, in float32, in chunks of vectors so that the
[chunk, codebook] distance matrix stays bounded.
"""

from __future__ import annotations

import torch
from torch import nn

SEARCH_CHUNK = 4096  # vectors per distance matrix


def nearest_code_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Indices [N] of the nearest rows of codebook [K, dim] to vectors z [N, dim] (the first index wins a tie)."""
    z, codebook = z.float(), codebook.float()
    code_sq = (codebook**2).sum(1)
    out = [torch.addmm((chunk**2).sum(1, keepdim=True) + code_sq, chunk, codebook.t(), alpha=-2.0).argmin(1)
           for chunk in z.split(SEARCH_CHUNK)]
    return torch.cat(out)


def nearest_codes(quantize: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latent [B, d, h, w] -> code indices [B, h, w] by `quantize.nearest`, in float32 even under autocast."""
    b, d, h, w = z.shape
    with torch.autocast(z.device.type, enabled=False):
        return quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

"""DDIM (Song et al. 2021) on the respaced schedule, with eta: 0 is deterministic, 1 matches DDPM's
posterior variance.

From the predicted x0 (clamped when clip_x0 > 0; eps is then re-derived from it, as ADM's ddim_sample):
x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma * temperature * noise,
sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev). The last step returns x0.
"""

from __future__ import annotations

import torch

from d2ctool.continuous import rng


def sample(denoise, x: torch.Tensor, settings, generator: torch.Generator | None = None) -> torch.Tensor:
    s = denoise.schedule
    abar = s.alphas_cumprod.tolist()
    for i in reversed(range(s.num_steps)):
        x0, _, _ = denoise.x0(x, i, settings.clip_x0)
        if i == 0:
            return x0
        a, a_prev = abar[i], abar[i - 1]
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        sigma = settings.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * settings.temperature * rng.randn(x.shape, x.device, generator)
    return x

"""MAR's sampler: ancestral DDPM steps over the respaced schedule, with the head's learned variance.

x_{t-1} = mean + exp(log_var / 2) * temperature * noise, where (mean, log_var) are those of p(x_{t-1} | x_t)
from the predicted eps and variance interpolation; the last step returns the mean.
"""

from __future__ import annotations

import torch

from d2ctool.continuous import rng


def sample(denoise, x: torch.Tensor, settings, generator: torch.Generator | None = None) -> torch.Tensor:
    s = denoise.schedule
    for i in reversed(range(s.num_steps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps, v = denoise(x, i)
        mean, log_var = s.p_mean_log_var(x, t, eps, v, settings.clip_x0)
        if i > 0:
            x = mean + torch.exp(0.5 * log_var) * rng.randn(x.shape, x.device, generator) * settings.temperature
        else:
            x = mean
    return x

"""DPM-Solver++(2M) (Lu et al. 2022): the multistep second-order solver of the probability-flow ODE in
data prediction, on the respaced schedule's timesteps t_{K-1} > ... > t_0.

With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h = lambda_next - lambda_now:
x_next = (sigma_next / sigma_now) x - alpha_next (exp(-h) - 1) D, where D is the x0 prediction at the first
step and (1 + 1/(2r)) x0_now - 1/(2r) x0_prev afterwards (r = h_prev / h). The step into t_0 is first order
(the solver's `lower_order_final`): sigma is ~0.006 there, so h is large, r small and the two-step
extrapolation unstable. The x0 prediction at t_0 is returned: K network
evaluations in all, as DDPM's K steps. clip_x0 clamps every x0 prediction (the solver's thresholding);
CFG mixes eps before x0 is formed.
"""

from __future__ import annotations

import math

import torch


def sample(denoise, x: torch.Tensor, settings, generator: torch.Generator | None = None) -> torch.Tensor:
    s = denoise.schedule
    abar = s.alphas_cumprod.tolist()
    alpha = [a**0.5 for a in abar]
    sigma = [(1 - a) ** 0.5 for a in abar]
    lam = [math.log(al / si) for al, si in zip(alpha, sigma)]
    x0_prev, h_prev = None, None
    for i in reversed(range(s.num_steps)):
        x0, _, _ = denoise.x0(x, i, settings.clip_x0)
        if i == 0:
            return x0
        h = lam[i - 1] - lam[i]
        first_order = x0_prev is None or i == 1
        if first_order:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x

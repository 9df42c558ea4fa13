"""MAR's diffusion head: a small denoiser that models each token's distribution given the decoder's z.

The network (`AdaLNMLP`, stored as `diffloss.net` in MAR's checkpoints) is a residual MLP whose blocks
are modulated (adaLN) by timestep embedding + projected z. It predicts epsilon and, in a second half of
its output, the interpolation v in [-1, 1] between the two standard variances (IDDPM's learned range):
log sigma^2 = f log beta_t + (1 - f) log beta~_t with f = (v + 1) / 2.

Training (`DiffusionHead.forward`): cosine schedule, uniform t in [0, T), loss = MSE(eps) + VLB, where the
VLB only trains the variance (the predicted mean is detached there), in bits per dimension, with the
discretized-Gaussian decoder term at t = 0, as in ADM/IDDPM's `training_losses` for learned range.
Sampling (`DiffusionHead.sample`): one of the samplers in `samplers/` (MAR's ancestral DDPM by default)
over a respaced schedule chosen at sample time; the network is always fed the original timestep index;
CFG mixes epsilon only (`GuidedDenoiser`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from d2ctool.continuous import rng
from d2ctool.continuous.blocks import LN_EPS
from d2ctool.errors import UserError

COSINE_OFFSET = 0.008  # s in alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2)
MAX_BETA = 0.999


def cosine_betas(steps: int) -> torch.Tensor:
    """Betas (float64) that discretise the cosine alpha_bar over `steps` steps, each clipped at 0.999."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), MAX_BETA) for i in range(steps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def spaced_timesteps(steps: int, count: int) -> list[int]:
    """`count` timesteps spread evenly over [0, steps - 1], rounded the way ADM's respacing rounds them
    (a running float sum and Python's round), so that a respaced schedule equals MAR's."""
    if not 2 <= count <= steps:
        raise ValueError(f"cannot respace {steps} diffusion steps to {count}")
    stride, position, taken = (steps - 1) / (count - 1), 0.0, []
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return taken


class NoiseSchedule:
    """The Gaussian diffusion tables of one schedule, in float64, served as float32 on any device."""

    def __init__(self, betas: torch.Tensor, timesteps: list[int] | None = None):
        betas = betas.double()
        self.num_steps = len(betas)
        # index fed to the network at each step of this schedule (a respaced one keeps the original index)
        self.timesteps = list(range(self.num_steps)) if timesteps is None else list(timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.betas, self.alphas_cumprod, self.posterior_variance = betas, ac, posterior_variance
        self._tables = {
            "sqrt_ac": ac.sqrt(),
            "sqrt_one_minus_ac": (1.0 - ac).sqrt(),
            "sqrt_recip_ac": (1.0 / ac).sqrt(),
            "sqrt_recipm1_ac": (1.0 / ac - 1).sqrt(),
            "posterior_coef_x0": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_coef_xt": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            # the posterior variance is 0 at t = 0: its log takes the value of t = 1 there
            "posterior_log_var": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            "log_betas": betas.log(),
            "timesteps": torch.tensor(self.timesteps, dtype=torch.long, device="cpu"),
        }
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def respaced(self, count: int) -> "NoiseSchedule":
        """`count` of this schedule's steps with betas recomputed so that alphas_cumprod is unchanged."""
        keep = spaced_timesteps(self.num_steps, count)
        ac = self.alphas_cumprod[keep]
        betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        return NoiseSchedule(betas, [self.timesteps[i] for i in keep])

    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Table `name` at step indices t [N] -> [N, 1] (float32; the network index for "timesteps")."""
        tables = self._on_device.get(t.device)
        if tables is None:
            tables = {k: (v if v.dtype == torch.long else v.float()).to(t.device) for k, v in self._tables.items()}
            self._on_device[t.device] = tables
        values = tables[name][t]
        return values if name == "timesteps" else values[:, None]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.at("sqrt_ac", t) * x0 + self.at("sqrt_one_minus_ac", t) * noise

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self.at("posterior_coef_x0", t) * x0 + self.at("posterior_coef_xt", t) * xt

    def p_mean_log_var(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor,
                       clip_x0: float = 0.0):
        """Mean and log-variance of p(x_{t-1} | x_t) from predicted epsilon and variance interpolation v.
        With clip_x0 > 0 the implied x0 is clamped to [-clip_x0, clip_x0] first (ADM's clip_denoised)."""
        x0 = self.at("sqrt_recip_ac", t) * xt - self.at("sqrt_recipm1_ac", t) * eps
        if clip_x0 > 0:
            x0 = x0.clamp(-clip_x0, clip_x0)
        frac = (v + 1) / 2
        log_var = frac * self.at("log_betas", t) + (1 - frac) * self.at("posterior_log_var", t)
        return self.posterior(x0, xt, t), log_var


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of Phi, as in the reference implementation (kept for matching loss values)
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) under N(mean, exp(log_scale)^2) integrated over bins of width 2/255 on [-1, 1], the outer
    bins open-ended (ADM's decoder term, which MAR applies to latents as they are)."""
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep (cos half, then sin half) through a 2-layer MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """(x_t [N, C], t [N], z [N, Z]) -> [N, 2C]: epsilon, then the variance interpolation v."""

    def __init__(self, channels: int, width: int, cond_dim: int, depth: int, grad_checkpointing: bool = False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # adaLN-zero: every block starts as the identity, the output at zero
        for layer in [*(b.adaLN_modulation[-1] for b in self.res_blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(z)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


@dataclass
class GuidedDenoiser:
    """The head's network at step i of a sampling schedule, with classifier-free guidance as MAR applies it:
    both conditions in one batch, eps = eps_u + scale (eps_c - eps_u), the variance output from the
    conditional half. `guided(i)` says whether step i is guided; where it is not, only the conditional half
    runs."""

    net: nn.Module
    schedule: NoiseSchedule
    z: torch.Tensor  # [N, Z] the condition of each row
    z_uncond: torch.Tensor | None = None  # [N, Z] the unconditional one; None: no guidance at all
    cfg_scale: float = 1.0
    noise_window: tuple[float, float] | None = None  # guide only where timestep / (T - 1) lies in it
    train_steps: int = 1000

    def guided(self, i: int) -> bool:
        if self.z_uncond is None:
            return False
        if self.noise_window is None:
            return True
        level = self.schedule.timesteps[i] / max(self.train_steps - 1, 1)
        return self.noise_window[0] <= level <= self.noise_window[1]

    def __call__(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, v) [N, C] each, float32, at step index i of the schedule."""
        n, c = x.shape
        t_net = self.schedule.at("timesteps", torch.full((n,), i, dtype=torch.long, device=x.device))
        if not self.guided(i):
            eps, v = self.net(x, t_net, self.z).float().split(c, dim=1)
            return eps, v
        out = self.net(torch.cat([x, x]), torch.cat([t_net, t_net]), torch.cat([self.z, self.z_uncond])).float()
        eps, v = out.split(c, dim=1)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + self.cfg_scale * (eps_c - eps_u), v[:n]

    def x0(self, x: torch.Tensor, i: int, clip_x0: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, eps, v) at step i: the data prediction implied by eps, clamped to [-clip_x0, clip_x0] if clip_x0 > 0."""
        eps, v = self(x, i)
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        x0 = self.schedule.at("sqrt_recip_ac", t) * x - self.schedule.at("sqrt_recipm1_ac", t) * eps
        return (x0.clamp(-clip_x0, clip_x0) if clip_x0 > 0 else x0), eps, v


class DiffusionHead(nn.Module):
    """Per-token diffusion loss and sampler. Stored in MAR as `diffloss` (its network as `diffloss.net`)."""

    def __init__(self, channels: int, cond_dim: int, width: int, depth: int, steps: int = 1000,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.channels = channels
        self.net = AdaLNMLP(channels, width, cond_dim, depth, grad_checkpointing)
        self.train_schedule = NoiseSchedule(cosine_betas(steps))
        self._sample_schedules: dict[int, NoiseSchedule] = {}

    def sample_schedule(self, steps: int) -> NoiseSchedule:
        """The training schedule respaced to `steps` steps (ADM's respacing; cached)."""
        if steps not in self._sample_schedules:
            if not 2 <= steps <= self.train_schedule.num_steps:
                raise UserError(f"stage2.num_sampling_steps must lie in [2, {self.train_schedule.num_steps}] (the "
                                f"head was trained with diffusion_steps {self.train_schedule.num_steps}), got {steps}")
            self._sample_schedules[steps] = self.train_schedule.respaced(steps)
        return self._sample_schedules[steps]

    def losses(self, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-row loss [N] = MSE(eps) + VLB (bits/dim; trains the variance only) for given t and noise."""
        s = self.train_schedule
        x0 = x0.float()
        xt = s.q_sample(x0, t, noise)
        eps, v = self.net(xt, t, z).float().split(self.channels, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=1)
        mean, log_var = s.p_mean_log_var(xt, t, eps.detach(), v)
        true_mean, true_log_var = s.posterior(x0, xt, t), s.at("posterior_log_var", t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean loss over rows of target [N, C] given z [N, Z]; only rows where mask is set count."""
        t = rng.randint(self.train_schedule.num_steps, (target.shape[0],), target.device, generator)
        noise = rng.randn(target.shape, target.device, generator)
        loss = self.losses(target, z, t, noise)
        if self.training:  # for logging the loss by noise level (continuous/train.py), not for the gradient
            self.last_terms = (t.detach(), loss.detach(), None if mask is None else mask.detach())
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, settings, cfg_scale: float = 1.0, z_uncond: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of z [N, Z] -> [N, C] (float32), with the head sampler and steps of `settings`
        (a ContinuousSamplingConfig). With z_uncond, CFG at `cfg_scale` (see GuidedDenoiser); under
        cfg_schedule interval-noise only on the head's noise levels inside the interval.

        settings.clip_x0 > 0 bounds the x0 implied by eps at every step. MAR samples unclipped (0), which needs a
        head whose eps is very accurate at the first steps: at t = 999 of the cosine schedule x0 is
        (x_t - sqrt(1 - abar) eps) / sqrt(abar) with 1 / sqrt(abar) ~ 2e4, so an eps error of 0.05 puts
        x0 near 1,000 and the chain never recovers; clipping at the data's range removes that."""
        from d2ctool.continuous.samplers import HEAD_SAMPLERS

        schedule = self.sample_schedule(settings.num_sampling_steps)
        window = ((settings.cfg_interval_low, settings.cfg_interval_high)
                  if settings.cfg_schedule == "interval-noise" else None)
        denoiser = GuidedDenoiser(self.net, schedule, z, z_uncond, cfg_scale, window, self.train_schedule.num_steps)
        noise = rng.randn((z.shape[0], self.channels), z.device, generator)
        return HEAD_SAMPLERS[settings.sampler](denoiser, noise, settings, generator)

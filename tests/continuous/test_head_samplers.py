"""The diffusion head's samplers on analytic cases: a network that returns the exact eps of a known data
distribution (a Gaussian, a mixture of Gaussians), so each sampler's output distribution can be checked
against the data's, and its error against the number of steps."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import nn

from d2ctool.continuous.config import HEAD_SAMPLERS as SAMPLER_NAMES
from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.continuous.diffusion import DiffusionHead
from d2ctool.continuous.samplers import HEAD_SAMPLERS
from d2ctool.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

N = 10_000  # samples per distribution check: Monte-Carlo error of a covariance entry ~0.005 here
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)


class ExactEps(nn.Module):
    """eps = E[eps | x_t] for data that is, per condition (z[:, 0] rounded), a mixture of Gaussians
    sum_k w_k N(m_k, S_k): x_t = a x0 + s eps has components N(a m_k, a^2 S_k + s^2 I) and
    E[eps | x_t] = sum_k r_k(x_t) s (a^2 S_k + s^2 I)^-1 (x_t - a m_k). Outputs v = -1 (posterior variance).
    Records the rows of every call, to see when the unconditional half runs."""

    def __init__(self, alphas_cumprod: torch.Tensor, mixtures: list[list[tuple[float, torch.Tensor, torch.Tensor]]]):
        super().__init__()
        self.ab, self.rows = alphas_cumprod.double(), []
        # eigendecompositions: (a^2 S + s^2 I)^-1 = U diag(1 / (a^2 lam + s^2)) U^T
        self.mixtures = [[(w, m.double(), *torch.linalg.eigh(c.double())) for w, m, c in mix] for mix in mixtures]

    def forward(self, x, t, z):
        self.rows.append((x.shape[0], int(t[0])))
        x, ab = x.double(), self.ab[t.long()][:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = torch.zeros_like(x)
        for c, mix in enumerate(self.mixtures):
            rows = z[:, 0].round().long() == c
            logs, terms = [], []
            for w, m, lam, u in mix:
                var = ab[rows] * lam + (1 - ab[rows])  # [n, C] in the eigenbasis
                d = (x[rows] - a[rows] * m) @ u
                logs.append(math.log(w) - 0.5 * (d * d / var).sum(1) - 0.5 * var.log().sum(1))
                terms.append((s[rows] * d / var) @ u.T)
            r = torch.softmax(torch.stack(logs, 1), 1)
            eps[rows] = (r[..., None] * torch.stack(terms, 1)).sum(1)
        return torch.cat([eps, -torch.ones_like(eps)], 1).float()


def head_for(*mixtures) -> DiffusionHead:
    head = DiffusionHead(2, cond_dim=1, width=8, depth=1, steps=1000)
    head.net = ExactEps(head.train_schedule.alphas_cumprod, list(mixtures))
    return head


def gaussian(mean=MU, cov=COV):
    return [(1.0, torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64))]


def draw(head, sampler, steps, condition=0, n=N, seed=0, z_uncond_condition=None, cfg_scale=1.0, **settings):
    z = torch.full((n, 1), float(condition))
    z_uncond = None if z_uncond_condition is None else torch.full((n, 1), float(z_uncond_condition))
    s = ContinuousSamplingConfig(sampler=sampler, num_sampling_steps=steps, **settings)
    return head.sample(z, s, cfg_scale, z_uncond, torch.Generator().manual_seed(seed)).double()


def moment_error(x, mean, cov) -> float:
    """The largest deviation of the sample mean and covariance from the given ones."""
    return max(float((x.mean(0) - mean).abs().max()), float((torch.cov(x.T) - cov).abs().max()))


def test_the_sampler_table_is_the_configs_list():
    assert tuple(HEAD_SAMPLERS) == SAMPLER_NAMES
    assert typing.get_args(typing.get_type_hints(ContinuousSamplingConfig)["sampler"]) == SAMPLER_NAMES


@pytest.mark.parametrize("sampler, steps, slope", [("ddpm", [10, 25, 100], 2.5), ("ddim", [10, 25, 100], 1.5),
                                                   ("dpm-solver++", [5, 10, 20], 1.0)])
def test_each_sampler_matches_a_gaussian_within_a_tolerance_that_shrinks_with_steps(sampler, steps, slope):
    head = head_for(gaussian())
    errors = [moment_error(draw(head, sampler, k), MU, COV) for k in steps]
    for k, error in zip(steps, errors):
        assert error <= slope / k + 0.015, (sampler, k, errors)
    # more steps, closer to the data (down to the Monte-Carlo floor, ~0.01 at N samples)
    assert all(b <= a + 0.005 for a, b in zip(errors, errors[1:])) and errors[0] > 3 * errors[-1], (sampler, errors)
    assert errors[-1] < 0.035


@pytest.mark.slow
def test_dpm_solver_at_10_to_20_steps_matches_ddpm_at_100_to_1000():
    head = head_for(gaussian())
    ddpm = {k: moment_error(draw(head, "ddpm", k), MU, COV) for k in (100, 1000)}
    dpm = {k: moment_error(draw(head, "dpm-solver++", k), MU, COV) for k in (10, 20)}
    assert dpm[20] <= ddpm[100] and dpm[20] < 0.02 and dpm[10] < 0.05, (dpm, ddpm)
    # both solve the same probability-flow ODE from the same x_T: per sample, 20 steps land where DDIM's 1,000 do
    ode = draw(head, "ddim", 1000, n=2000)
    assert float((draw(head, "dpm-solver++", 20, n=2000) - ode).abs().max()) < 0.03
    assert float((draw(head, "dpm-solver++", 10, n=2000) - ode).abs().max()) < 0.25


@pytest.mark.parametrize("sampler, steps", [("ddpm", 100), ("ddim", 50), ("dpm-solver++", 20)])
def test_each_sampler_recovers_a_two_mode_mixture(sampler, steps):
    mixture = [(0.3, torch.tensor([-1.5, 0.0]), 0.09 * torch.eye(2)), (0.7, torch.tensor([1.5, 0.5]), 0.09 * torch.eye(2))]
    head = head_for(mixture)
    x = draw(head, sampler, steps)
    right = x[:, 0] > 0
    assert abs(float(right.double().mean()) - 0.7) < 0.02  # the modes' weights
    for side, (_, m, c) in zip((~right, right), mixture):
        assert moment_error(x[side], m.double(), c.double()) < 0.04, sampler


def test_ddim_eta_one_is_stochastic_and_eta_zero_deterministic_in_the_noise():
    head = head_for(gaussian())
    a, b = draw(head, "ddim", 20, n=500, seed=0), draw(head, "ddim", 20, n=500, seed=1)
    assert not torch.allclose(a, b)  # different x_T
    # eta 0: the output is a function of x_T alone; eta 1 injects fresh noise at every step
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(500, 2, generator=g)
    z = torch.zeros(500, 1)
    eta0 = HEAD_SAMPLERS["ddim"]
    from d2ctool.continuous.diffusion import GuidedDenoiser

    denoiser = GuidedDenoiser(head.net, head.sample_schedule(20), z)
    s0, s1 = ContinuousSamplingConfig(sampler="ddim", num_sampling_steps=20), \
        ContinuousSamplingConfig(sampler="ddim", num_sampling_steps=20, eta=1.0)
    assert torch.equal(eta0(denoiser, x_t, s0, torch.Generator().manual_seed(1)),
                       eta0(denoiser, x_t, s0, torch.Generator().manual_seed(2)))
    assert not torch.allclose(eta0(denoiser, x_t, s1, torch.Generator().manual_seed(1)),
                              eta0(denoiser, x_t, s1, torch.Generator().manual_seed(2)))
    # and eta 1 still samples the data distribution
    assert moment_error(draw(head, "ddim", 100, eta=1.0), MU, COV) < 0.05


@pytest.mark.parametrize("sampler, steps", [("ddpm", 100), ("ddim", 50), ("dpm-solver++", 20)])
def test_cfg_extrapolates_the_mean_of_equal_covariance_gaussians(sampler, steps):
    """With equal covariances s^2 I, eps_u + w (eps_c - eps_u) is exactly the eps of N(mu_u + w (mu_c - mu_u),
    s^2 I): guided sampling must land there."""
    cov = 0.2 * torch.eye(2, dtype=torch.float64)
    mu_c, mu_u = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.tensor([0.2, -0.3], dtype=torch.float64)
    head = head_for(gaussian(mu_c, cov), gaussian(mu_u, cov))
    for w in (1.0, 3.0):
        x = draw(head, sampler, steps, condition=0, z_uncond_condition=1, cfg_scale=w)
        assert moment_error(x, mu_u + w * (mu_c - mu_u), cov) < 0.04, (sampler, w)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_cfg_noise_interval_runs_the_unconditional_half_only_inside_the_window(sampler):
    head = head_for(gaussian(), gaussian(MU + 1))
    steps, n = 10, 64
    timesteps = head.sample_schedule(steps).timesteps
    kw = dict(condition=0, z_uncond_condition=1, cfg_scale=2.0, n=n)
    head.net.rows.clear()
    windowed = draw(head, sampler, steps, cfg_schedule="interval-noise", cfg_interval_low=0.3, cfg_interval_high=0.7,
                    **kw)
    inside = {t for t in timesteps if 0.3 <= t / 999 <= 0.7}
    assert 0 < len(inside) < steps
    assert head.net.rows == [(2 * n if t in inside else n, t) for t in reversed(timesteps)]
    # the full window is constant guidance; an empty one is no guidance, and nothing unconditional runs
    assert torch.equal(draw(head, sampler, steps, cfg_schedule="interval-noise", **kw),
                       draw(head, sampler, steps, cfg_schedule="constant", **kw))
    head.net.rows.clear()
    none = draw(head, sampler, steps, cfg_schedule="interval-noise", cfg_interval_low=0.999, cfg_interval_high=0.9995,
                **kw)
    assert all(rows == n for rows, _ in head.net.rows)
    assert torch.equal(none, draw(head, sampler, steps, condition=0, n=n))
    assert not torch.allclose(windowed, none)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_clip_x0_bounds_every_sampler_and_leaves_data_inside_the_bound_alone(sampler):
    wide = head_for(gaussian([0.0, 0.0], 4 * torch.eye(2)))
    free, clipped = draw(wide, sampler, 20, n=2000), draw(wide, sampler, 20, n=2000, clip_x0=1.0)
    assert free.abs().max() > 3 and clipped.abs().max() <= 1.0 + 1e-5
    # exact x0 predictions of data within about +-2 never reach a bound of 5: nothing changes
    narrow = head_for(gaussian([0.0, 0.0], 0.25 * torch.eye(2)))
    assert torch.allclose(draw(narrow, sampler, 20, n=2000, clip_x0=5.0), draw(narrow, sampler, 20, n=2000), atol=1e-6)


def test_ddpm_is_mars_ancestral_step_exactly():
    """The default sampler draws x_T, then one noise per step, and steps with p(x_{t-1} | x_t) (MAR's order)."""
    head = head_for(gaussian())
    z = torch.zeros(7, 1)
    s = head.sample_schedule(5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, generator=g)
    for i in reversed(range(5)):
        t = torch.full((7,), i)
        eps, v = head.net(x, s.at("timesteps", t), z).split(2, dim=1)
        mean, log_var = s.p_mean_log_var(x, t, eps, v)
        x = mean + torch.exp(0.5 * log_var) * torch.randn(7, 2, generator=g) * 0.7 if i else mean
    out = head.sample(z, ContinuousSamplingConfig(num_sampling_steps=5, temperature=0.7), 1.0, None,
                      torch.Generator().manual_seed(3))
    assert torch.allclose(out, x, atol=1e-6)


def test_bad_head_settings_are_refused_clearly():
    head = head_for(gaussian())
    with pytest.raises(UserError, match=r"num_sampling_steps must lie in \[2, 1000\].*got 1001"):
        draw(head, "ddpm", 1001, n=2)
    from d2ctool.config import ConfigError

    with pytest.raises(ConfigError, match="temperature 0.8 .* dpm-solver\\+\\+ injects none"):
        ContinuousSamplingConfig(sampler="dpm-solver++", temperature=0.8).validate()
    with pytest.raises(ConfigError, match="ddim with eta 0 injects none"):
        ContinuousSamplingConfig(sampler="ddim", temperature=0.8).validate()
    ContinuousSamplingConfig(sampler="ddim", eta=0.5, temperature=0.8).validate()

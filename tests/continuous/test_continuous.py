"""Stage 2 (MAR with discrete-code fusion): official layouts and checkpoints, training, sampling, diffusion."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch
from torch import nn

from conftest import read_manifest
from d2ctool.continuous.diffusion import DiffusionHead, NoiseSchedule, cosine_betas, spaced_timesteps
from d2ctool.continuous.load import PRESETS, build_mar, init_from_checkpoint, load_mar, preset_config, save_mar
from d2ctool.continuous.model import truncated_normal_mask_ratio
from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.continuous.sample import sample_latents
from d2ctool.errors import UserError

FUSED = ["add", "prefix", "qformer", "crossattn"]
# sampling tests: few diffusion steps keep them fast on a CPU
FAST = {"num_sampling_steps": 4}


def stage2(**settings) -> ContinuousSamplingConfig:
    """Stage-2 sampling settings, FAST unless given."""
    return ContinuousSamplingConfig(**{**FAST, **settings})


pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny models run fastest on one thread




def tiny(fusion="none", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_mar(preset_config("mar-tiny", {"fusion": fusion, **overrides}))


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    labels = torch.arange(n) % 10
    codes = torch.randint(0, 512, (n, 64), generator=g)
    return latents, labels, codes


def randomise_fusion(model):
    """Give the zero-initialised fusion parameters values, so that codes change the output (and the head's
    zero-initialised output layer, so that its input matters)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("fusion.") or ".cross_attn." in name:
                p.normal_(0, 0.3)
            elif name.startswith("diffloss.net.final_layer."):
                p.normal_(0, 0.02)


# ----- official layouts and checkpoints --------------------------------------------------------------

@pytest.mark.parametrize("preset, manifest", [("mar-b", "manifest_mar_base.tsv"), ("mar-l", "manifest_mar_large.tsv"),
                                              ("mar-h", "manifest_mar_huge.tsv")])
def test_full_presets_have_the_official_keys_and_shapes(preset, manifest):
    with torch.device("meta"):  # no memory: shapes only
        model = build_mar(preset_config(preset))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = read_manifest(manifest)
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert ours == official


@pytest.mark.parametrize("preset", [p for p in PRESETS if "tiny" in p])
def test_tiny_presets_fit_the_tiny_tokenizers(preset):
    from d2ctool.tokenizers.load import preset_config as tokenizer_config

    suffix = preset.removeprefix("mar-tiny").removeprefix("-") or "s4"
    kl, vq = tokenizer_config("kl", f"kl-tiny-{suffix}"), tokenizer_config("vq", f"vq-tiny-{suffix}")
    cfg = preset_config(preset, {"fusion": "add"})
    assert (cfg.latent_channels, cfg.latent_size) == (kl.embed_dim, 32 // kl.stride)
    assert (cfg.code_vocab, cfg.code_size) == (vq.codebook_size, 32 // vq.stride)
    model = build_mar(cfg)
    s = cfg.latent_size
    loss = model(torch.randn(2, 4, s, s), torch.tensor([0, 1]), torch.randint(0, 512, (2, s * s)))
    assert math.isfinite(loss.item())


def test_official_container_loads_ema_strictly(tmp_path):
    model, ema = tiny(seed=0).state_dict(), tiny(seed=1).state_dict()
    path = tmp_path / "mar_tiny.pth"
    torch.save({"model": model, "model_ema": ema}, path)
    loaded, info = load_mar("mar-tiny", path)
    assert info.weights == "model_ema" and info.name == "mar-tiny" and len(info.sha256) == 64
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ema[key]), key
    assert not loaded.training


def test_official_training_checkpoint_with_args_namespace_loads(tmp_path):
    sd = tiny().state_dict()
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": sd, "model_ema": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mar_base", lr=8e-4)}, path)
    loaded, info = load_mar("mar-tiny", path)
    assert info.weights == "model_ema" and loaded.diffloss.sample_schedule(10).num_steps == 10
    # DDP-wrapped keys are unwrapped too
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    assert load_mar("mar-tiny", path)[1].weights == "model"


def test_mismatched_checkpoint_is_refused_with_a_listing(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model_ema": tiny(encoder_depth=3).state_dict()}, path)
    with pytest.raises(UserError, match=r"unexpected key\(s\): encoder_blocks\.2\."):
        load_mar("mar-tiny", path)
    with pytest.raises(UserError, match="init_from_checkpoint"):
        load_mar("mar-tiny", path, overrides={"fusion": "add", "encoder_depth": 3})
    with pytest.raises(UserError, match="unknown MAR preset 'mar-xl'"):
        preset_config("mar-xl")
    with pytest.raises(UserError, match="no MAR checkpoint given"):
        load_mar("mar-b", None)


def test_own_format_carries_its_config_and_ema(tmp_path):
    model = tiny("prefix")
    ema = tiny("prefix", seed=5).state_dict()
    path = tmp_path / "ours.pt"
    save_mar(path, model, name="mine", ema=ema)
    loaded, info = load_mar("mar-b", path)  # the preset is ignored: the file knows its architecture
    assert loaded.cfg == model.cfg and info.name == "mine" and info.weights == "model_ema"
    assert torch.equal(loaded.fusion.decoder_pos_embed, ema["fusion.decoder_pos_embed"])


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSED)
def test_official_checkpoint_initialises_a_fused_model(tmp_path, fusion):
    plain = tiny(seed=3)
    path = tmp_path / "mar.pth"
    torch.save({"model": tiny(seed=4).state_dict(), "model_ema": plain.state_dict(),
                "args": argparse.Namespace(epoch=400)}, path)
    fused = tiny(fusion, seed=9)
    new = init_from_checkpoint(fused, path)
    assert new and all(k.startswith("fusion.") or ".cross_attn." in k or ".norm_cross." in k for k in new)
    assert set(new) == set(fused.state_dict()) - set(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    if fusion in ("add", "crossattn"):  # zero-initialised fusion: the model starts out as the plain MAR
        latents, labels, codes = batch()
        plain.eval(), fused.eval()
        tokens = plain.patchify(latents)
        orders = plain.sample_orders(4, "cpu", torch.Generator().manual_seed(0))
        mask = plain.random_mask(orders, torch.Generator().manual_seed(0))
        emb = plain.class_emb(labels)
        with torch.no_grad():
            z_plain = plain.decode(plain.encode(tokens, mask, emb), mask)
            ctx = fused.code_context(codes)
            z_fused = fused.decode(fused.encode(tokens, mask, emb, ctx), mask, ctx)
        assert torch.allclose(z_plain, z_fused, atol=1e-6)


def test_initialising_from_a_different_architecture_is_refused(tmp_path):
    path = tmp_path / "mar.pth"
    torch.save({"model_ema": tiny(encoder_dim=32, decoder_dim=32).state_dict()}, path)
    with pytest.raises(UserError, match=r"shape mismatch\(es\) \(file vs model\): class_emb.weight \[1000, 32\] vs "
                                        r"\[1000, 64\]"):
        init_from_checkpoint(tiny("qformer"), path)
    torch.save({"model_ema": tiny(decoder_depth=3).state_dict()}, path)
    with pytest.raises(UserError, match=r"key\(s\) the model lacks: decoder_blocks\.2\."):
        init_from_checkpoint(tiny("add"), path)


# ----- training ----------------------------------------------------------------------------------------

def structured_latents(n=6):
    """Smooth, distinct patterns (a fixed 'data set' the tiny model can memorise)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    out = []
    for i in range(n):
        chans = [torch.sin(3 * x * (c + 1) + i) * torch.cos(2 * y + c * i) for c in range(4)]
        out.append(torch.stack(chans))
    return torch.stack(out)


@pytest.mark.parametrize("fusion", ["none", *FUSED])
def test_every_fusion_trains(fusion):
    model = tiny(fusion, seed=0, label_drop_prob=0.0)
    latents = structured_latents()
    labels = torch.arange(6)
    codes = None if fusion == "none" else torch.randint(0, 512, (6, 64), generator=torch.Generator().manual_seed(1))

    def eval_loss():
        with torch.no_grad():
            return sum(model(latents, labels, codes, generator=torch.Generator().manual_seed(s)).item()
                       for s in range(4)) / 4

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(40):
        loss = model(latents, labels, codes, generator=g)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter takes part (DDP needs no find_unused_parameters)
            assert [n for n, p in model.named_parameters() if p.grad is None] == []
        opt.step()
    after = eval_loss()
    assert math.isfinite(after) and after < 0.6 * before, (before, after)


def test_code_corruption_replaces_a_fraction_in_training_only():
    model = tiny("add", code_corrupt_prob=0.5)
    seen = []
    model.fusion.forward = lambda codes: seen.append(codes) or None
    codes = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    model.train().code_context(codes, torch.Generator().manual_seed(1))
    model.eval().code_context(codes, torch.Generator().manual_seed(1))
    changed = (seen[0] != codes).float().mean().item()
    assert 0.4 < changed < 0.55  # half are replaced, a few of them by the same code
    assert 0 <= seen[0].min() and seen[0].max() < 512
    assert torch.equal(seen[1], codes)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    latents, labels, codes = batch()
    results = []
    for ckpt in (False, True):
        model = tiny("crossattn", seed=0, grad_checkpointing=ckpt).train()
        randomise_fusion(model)
        loss = model(latents, labels, codes, generator=torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


def test_bf16_autocast_forward_and_sampling_run():
    model = tiny("prefix")
    latents, labels, codes = batch()
    full = model(latents, labels, codes, generator=torch.Generator().manual_seed(0))  # fp32, the same draws
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(latents, labels, codes, generator=torch.Generator().manual_seed(0))
        loss.backward()
        out = sample_latents(model, labels, codes, stage2(num_iter=2, cfg_scale=2.0))
    assert math.isfinite(loss.item()) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert loss.item() == pytest.approx(full.item(), rel=0.05)  # bf16 rounds, it does not change the loss
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_mask_ratio_is_a_truncated_gaussian_on_0_7_to_1():
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([truncated_normal_mask_ratio(0.7, g) for _ in range(3000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    reference = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert abs(draws.mean().item() - reference.mean()) < 0.005
    assert abs(draws.std().item() - reference.std()) < 0.005
    assert stats.kstest(draws.numpy(), reference.cdf).pvalue > 0.01
    model = tiny()
    orders = model.sample_orders(3, "cpu", g)
    assert all(sorted(o.tolist()) == list(range(64)) for o in orders) and not torch.equal(orders[0], orders[1])
    for _ in range(20):
        mask = model.random_mask(orders, g)
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and math.ceil(0.7 * 64) <= counts[0] <= 64
        # the masked tokens are the first ones of each order
        assert all(mask[i, orders[i, : counts[0]]].all() for i in range(3))


# ----- sampling ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, schedule", [(1.0, "linear"), (3.0, "linear"), (2.0, "constant")])
def test_sampling_shapes_and_determinism(cfg, schedule):
    model = tiny()
    labels = torch.tensor([1, 2, 3])

    def run(seed):
        return sample_latents(model, labels, None, stage2(num_iter=4, cfg_scale=cfg, cfg_schedule=schedule),
                              generator=torch.Generator().manual_seed(seed))

    a = run(0)
    assert a.shape == (3, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, run(0)) and not torch.allclose(a, run(1))
    assert model.training  # the mode is restored


def test_unconditional_sampling_and_one_token_per_step():
    model = tiny(**FAST)
    out = sample_latents(model, None, None, stage2(num_iter=64, temperature=0.5), batch=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="batch size"):
        sample_latents(model, None)
    with pytest.raises(UserError, match="cfg_interval_low 0.6 exceeds cfg_interval_high 0.4"):
        sample_latents(model, torch.tensor([0]), None, stage2(cfg_interval_low=0.6, cfg_interval_high=0.4))


@pytest.mark.parametrize("fusion", FUSED)
def test_codes_condition_the_samples(fusion):
    model = tiny(fusion)
    randomise_fusion(model)
    _, labels, codes = batch(2)
    other = (codes + 1) % 512

    def run(c):
        return sample_latents(model, labels, c, stage2(num_iter=3, cfg_scale=1.5), generator=torch.Generator().manual_seed(0))

    same = run(codes)
    assert torch.equal(same, run(codes.clone()))
    assert (same - run(other)).abs().max() > 1e-3


# ----- diffusion ---------------------------------------------------------------------------------------

def test_cosine_schedule_matches_the_closed_form():
    steps = 1000

    def alpha_bar(t):
        return math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = cosine_betas(steps)
    assert betas.dtype == torch.float64 and betas.shape == (steps,)
    assert betas.max() == 0.999 and (betas > 0).all()
    closed = torch.tensor([alpha_bar(t + 1) / alpha_bar(0) for t in range(steps)], dtype=torch.float64)
    ac = NoiseSchedule(betas).alphas_cumprod
    clipped = betas > 0.999 - 1e-12
    assert clipped.nonzero().flatten().tolist() == [steps - 1]  # only the last step is clipped
    assert torch.allclose(ac[:-1], closed[:-1], rtol=1e-10, atol=1e-14)
    assert torch.isclose(ac[-1], ac[-2] * 0.001, rtol=1e-10)
    assert abs(ac[0].item() - alpha_bar(1) / alpha_bar(0)) < 1e-12


def test_respaced_schedule():
    base = NoiseSchedule(cosine_betas(1000))
    spaced = base.respaced(100)
    assert spaced.timesteps == [round(i * 999 / 99) for i in range(100)] == spaced_timesteps(1000, 100)
    assert spaced.timesteps[:7] == [0, 10, 20, 30, 40, 50, 61] and spaced.timesteps[-1] == 999
    kept = base.alphas_cumprod[spaced.timesteps]
    assert torch.allclose(spaced.alphas_cumprod, kept, rtol=1e-12)
    expected = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    assert torch.allclose(spaced.betas, expected, rtol=1e-12)
    t = torch.tensor([0, 5, 99])
    assert spaced.at("timesteps", t).tolist() == [0, 50, 999]
    with pytest.raises(ValueError):
        base.respaced(1)


class FakeNet(nn.Module):
    """Returns eps = z[:, :C], v = z[:, C:2C]; records the timesteps it is given."""

    def __init__(self, channels):
        super().__init__()
        self.channels, self.seen = channels, []

    def forward(self, x, t, z):
        self.seen.append(t.tolist())
        return z[:, : 2 * self.channels].clone()


@pytest.mark.slow
def test_head_sampling_feeds_original_timesteps_mixes_eps_and_scales_only_noise():
    c = 3
    head = DiffusionHead(c, cond_dim=8, width=16, depth=1, steps=1000)
    head.net = FakeNet(c)
    z = torch.randn(5, 8)
    z_uncond = torch.randn(5, 8)
    s = head.sample_schedule(2)
    assert s.timesteps == [0, 999]

    def expected(temperature, scale):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, c, generator=g)
        for i in (1, 0):
            t = torch.full((5,), i)
            eps = z_uncond[:, :c] + scale * (z[:, :c] - z_uncond[:, :c])
            mean, log_var = s.p_mean_log_var(x, t, eps, z[:, c:2 * c])
            x = mean + (torch.exp(0.5 * log_var) * torch.randn(5, c, generator=g) * temperature if i else 0)
        return x

    for temperature, scale in [(1.0, 1.0), (0.3, 4.0)]:
        head.net.seen.clear()
        out = head.sample(z, stage2(num_sampling_steps=2, temperature=temperature), scale, z_uncond, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, expected(temperature, scale), atol=1e-5)
        assert head.net.seen == [[999] * 10, [0] * 10]
    # without z_uncond there is no guidance: the conditional eps alone
    out = head.sample(z, stage2(num_sampling_steps=2, temperature=0.3), 1.0, None, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, expected(0.3, 1.0), atol=1e-5)


# ----- bad input ---------------------------------------------------------------------------------------

def test_clear_errors_for_bad_inputs():
    latents, labels, codes = batch()
    fused, plain = tiny("prefix"), tiny()
    with pytest.raises(UserError, match=r"codes: expected shape \[4, 64\] \(a 8x8 grid .*code_size 8\), got \[4, 256\]"):
        fused(latents, labels, torch.zeros(4, 256, dtype=torch.long))
    with pytest.raises(UserError, match=r"got \[4, 8, 8\]"):
        fused(latents, labels, codes.view(4, 8, 8))
    with pytest.raises(UserError, match=r"indices must lie in \[0, 511\]"):
        fused(latents, labels, codes + 512)
    with pytest.raises(UserError, match="none were given"):
        fused(latents, labels)
    with pytest.raises(UserError, match="fusion 'none'"):
        plain(latents, labels, codes)
    with pytest.raises(UserError, match=r"latents: expected shape \[B, 4, 8, 8\].*got \[4, 4, 16, 16\]"):
        plain(torch.zeros(4, 4, 16, 16), labels)
    with pytest.raises(UserError, match=r"class indices must lie in \[0, 999\]"):
        plain(latents, labels + 1000)
    with pytest.raises(UserError, match="code grid must equal the token grid"):
        preset_config("mar-tiny", {"fusion": "add", "code_size": 16})
    with pytest.raises(UserError, match="fusion: expected one of"):
        preset_config("mar-tiny", {"fusion": "concat"})
    with pytest.raises(UserError, match=r"codes: expected shape \[2, 64\]"):
        sample_latents(fused, labels[:2], codes[:2, :10])
    assert dataclasses.asdict(preset_config("mar-tiny", {"code_size": 4, "fusion": "qformer"}))["code_size"] == 4


def test_clip_x0_clamps_the_implied_x0_before_the_posterior():
    s = DiffusionHead(4, 8, 16, 1, steps=1000).sample_schedule(25)
    g = torch.Generator().manual_seed(0)
    xt, eps, v = (torch.randn(6, 4, generator=g) for _ in range(3))
    t = torch.tensor([24, 24, 20, 10, 1, 0])
    x0 = s.at("sqrt_recip_ac", t) * xt - s.at("sqrt_recipm1_ac", t) * eps
    assert x0[:2].abs().max() > 100  # at the first step, 1/sqrt(alpha_bar) ~ 2e4 amplifies any eps error
    mean, log_var = s.p_mean_log_var(xt, t, eps, v, clip_x0=2.5)
    assert torch.allclose(mean, s.posterior(x0.clamp(-2.5, 2.5), xt, t))
    unclipped, log_var0 = s.p_mean_log_var(xt, t, eps, v)
    assert torch.allclose(unclipped, s.posterior(x0, xt, t)) and torch.equal(log_var, log_var0)


def test_an_inaccurate_head_diverges_unclipped_and_stays_in_range_clipped():
    """A fresh head predicts eps = 0 (adaLN-zero), the extreme of an inaccurate one: MAR's unclipped sampler
    then starts from x0 ~ x_T / sqrt(alpha_bar_T) ~ 1e4; bounding x0 keeps the latents at the data's scale."""
    model = tiny()
    labels = torch.arange(4)
    wild = sample_latents(model, labels, None, stage2(num_iter=2, num_sampling_steps=25), generator=torch.Generator().manual_seed(0))
    tame = sample_latents(model, labels, None, stage2(num_iter=2, num_sampling_steps=25, clip_x0=3.0), generator=torch.Generator().manual_seed(0))
    assert wild.abs().max() > 100
    assert tame.abs().max() <= 3.0 + 1e-4  # the last step returns the posterior mean at t = 0: x0 itself

"""Stage 2's fast path: few AR iterations for every fusion, mask and CFG schedules, the guidance interval
over AR steps (no unconditional pass outside it), the num_iter clamp, and checkpoints from before the
sampling settings left the architecture config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from d2ctool.continuous.config import FUSIONS, ContinuousSamplingConfig
from d2ctool.continuous.load import build_mar, load_mar, preset_config, save_mar
from d2ctool.continuous.sample import cfg_at_step, masked_after, sample_latents
from d2ctool.errors import UserError
from d2ctool.training.trainer import CHECKPOINT_FORMAT

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(fusion="none", seed=0):
    torch.manual_seed(seed)
    model = build_mar(preset_config("mar-tiny", {"fusion": fusion})).eval()
    with torch.no_grad():  # fresh adaLN-zero and fusion outputs are zero, so conditions would change nothing
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def settings(**kw) -> ContinuousSamplingConfig:
    return ContinuousSamplingConfig(**{"num_sampling_steps": 3, "cfg_scale": 2.0, "clip_x0": 3.0, **kw})


def inputs(fusion, n=3):
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 1000, (n,), generator=g)
    codes = torch.randint(0, 512, (n, 64), generator=g) if fusion != "none" else None
    return labels, codes


def record_head_calls(model, monkeypatch) -> list[int]:
    """Rows the diffusion head samples at each call (one call per AR step that reveals tokens)."""
    calls, real = [], model.diffloss.sample

    def spy(z, *args, **kw):
        calls.append(z.shape[0])
        return real(z, *args, **kw)

    monkeypatch.setattr(model.diffloss, "sample", spy)
    return calls


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("num_iter", [1, 2, 4])
def test_few_iterations_work_for_every_fusion(fusion, num_iter, monkeypatch):
    model = tiny(fusion)
    labels, codes = inputs(fusion)
    calls = record_head_calls(model, monkeypatch)
    steps = []
    out = sample_latents(model, labels, codes, settings(num_iter=num_iter), generator=torch.Generator().manual_seed(0),
                         progress=lambda k, n: steps.append((k, n)))
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 3.0 + 1e-4
    assert steps == [(k + 1, num_iter) for k in range(num_iter)]
    assert len(calls) == num_iter and sum(calls) == 3 * 64  # every token exactly once
    if num_iter == 1:
        assert calls == [3 * 64]  # all tokens in one step


def test_mask_schedules_cosine_and_linear():
    assert [masked_after(k, 4, 64, "cosine") for k in range(4)] == [math.floor(64 * math.cos(math.pi / 2 * (k + 1) / 4))
                                                                   for k in range(4)]
    assert [masked_after(k, 4, 64, "linear") for k in range(4)] == [48, 32, 16, 0]


@pytest.mark.parametrize("schedule, revealed", [("cosine", [5, 14, 21, 24]), ("linear", [16, 16, 16, 16])])
def test_the_mask_schedule_sets_how_many_tokens_each_step_reveals(schedule, revealed, monkeypatch):
    model = tiny()
    calls = record_head_calls(model, monkeypatch)
    sample_latents(model, torch.tensor([1]), None, settings(num_iter=4, mask_schedule=schedule),
                   generator=torch.Generator().manual_seed(0))
    assert calls == revealed and sum(revealed) == 64


def test_num_iter_is_clamped_to_the_token_count(monkeypatch):
    model = tiny()
    calls = record_head_calls(model, monkeypatch)
    out = sample_latents(model, torch.tensor([1]), None, settings(num_iter=500), generator=torch.Generator().manual_seed(0))
    assert calls == [1] * 64 and torch.isfinite(out).all()


def test_cfg_schedules_per_ar_step():
    s = settings(cfg_scale=3.0, num_iter=4)
    assert cfg_at_step(s, 0, 4, 60, 64) == pytest.approx(1 + 2.0 * 4 / 64)  # linear: MAR's
    assert cfg_at_step(dataclasses.replace(s, cfg_schedule="constant"), 0, 4, 60, 64) == 3.0
    window = dataclasses.replace(s, cfg_schedule="interval-ar", cfg_interval_low=0.25, cfg_interval_high=0.5)
    assert [cfg_at_step(window, k, 4, 0, 64) for k in range(4)] == [1.0, 3.0, 3.0, 1.0]
    noise = dataclasses.replace(s, cfg_schedule="interval-noise")  # the head applies the window per noise level
    assert [cfg_at_step(noise, k, 4, 0, 64) for k in range(4)] == [3.0] * 4


def test_guidance_interval_over_ar_steps_skips_the_unconditional_half(monkeypatch):
    model = tiny("add")
    labels, codes = inputs("add", 2)
    batches, real = [], model.encode

    def spy(tokens, mask, class_emb, ctx=None):
        batches.append(tokens.shape[0])
        return real(tokens, mask, class_emb, ctx)

    monkeypatch.setattr(model, "encode", spy)
    s = settings(num_iter=4, cfg_scale=3.0, cfg_schedule="interval-ar", cfg_interval_low=0.25, cfg_interval_high=0.5)
    windowed = sample_latents(model, labels, codes, s, generator=torch.Generator().manual_seed(0))
    assert batches == [2, 4, 4, 2]  # guided steps 1 and 2 only: the batch is doubled there and nowhere else
    batches.clear()
    unguided = sample_latents(model, labels, codes, settings(num_iter=4, cfg_scale=1.0),
                              generator=torch.Generator().manual_seed(0))
    assert batches == [2, 2, 2, 2] and not torch.allclose(windowed, unguided)
    # an interval that holds no step is no guidance at all
    empty = dataclasses.replace(s, cfg_interval_low=0.9, cfg_interval_high=0.95)
    assert torch.equal(sample_latents(model, labels, codes, empty, generator=torch.Generator().manual_seed(0)), unguided)


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_few_step_samplers_run_the_whole_chain(sampler):
    model = tiny("crossattn")
    labels, codes = inputs("crossattn")
    a = sample_latents(model, labels, codes, settings(num_iter=2, sampler=sampler, num_sampling_steps=5),
                       generator=torch.Generator().manual_seed(0))
    b = sample_latents(model, labels, codes, settings(num_iter=2, sampler=sampler, num_sampling_steps=5),
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.abs().max() <= 3.0 + 1e-4


def test_bad_stage2_settings_are_refused_before_sampling():
    model = tiny()
    with pytest.raises(UserError, match=r"stage2: temperature 0.5 .*dpm-solver\+\+ injects none"):
        sample_latents(model, torch.tensor([0]), None, settings(sampler="dpm-solver++", temperature=0.5))
    with pytest.raises(UserError, match=r"num_sampling_steps must lie in \[2, 1000\]"):
        sample_latents(model, torch.tensor([0]), None, settings(num_sampling_steps=2000))


def test_checkpoints_that_kept_num_sampling_steps_in_their_architecture_still_load(tmp_path):
    model = tiny("add")
    config = {**dataclasses.asdict(model.cfg), "num_sampling_steps": 25}  # as written before it moved
    sd = model.state_dict()
    ours = tmp_path / "own.pt"
    save_mar(ours, model)
    payload = torch.load(ours, weights_only=False)
    payload["config"] = config
    torch.save(payload, ours)
    run = tmp_path / "run.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "task": "train-continuous", "model": sd, "ema": None,
                "model_config": config, "config": {}}, run)
    for path in (ours, run):
        loaded, info = load_mar("mar-b", path)
        assert loaded.cfg == model.cfg and "num_sampling_steps" not in info.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())

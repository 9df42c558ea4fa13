"""Sampling latents with MAR's iterative schedule.

All tokens start masked and each sample gets a random order. At step k of `num_iter` (at most the token
count L), the encoder and decoder see the tokens generated so far; the next step keeps
floor(L * m((k+1) / num_iter)) tokens masked (at least one, and at least one fewer than now), with
m(r) = cos(pi/2 r) (MAR's `cosine`) or 1 - r (`linear`), and the tokens leaving the mask are drawn by the
diffusion head; the last step draws all that remain (num_iter 1: every token at once). CFG runs the
conditional and unconditional (`fake_latent`) halves in one batch; its scale is constant, grows linearly
with the share of tokens generated (`linear`, as MAR, after Muse), or applies only inside an interval of
the AR steps or of the head's noise levels (Kynkäänniemi et al. 2024), where outside it the unconditional
half is not computed. The discrete codes, if any, condition both halves.
"""

from __future__ import annotations

import math

import torch

from d2ctool.config import ConfigError
from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.continuous.model import MAR
from d2ctool.errors import UserError


def check_settings(settings: ContinuousSamplingConfig, model: MAR) -> None:
    """Refuse stage-2 settings this model cannot sample with, before any work."""
    try:
        settings.validate()
    except ConfigError as e:
        raise UserError(f"stage2: {e}") from None
    model.diffloss.sample_schedule(settings.num_sampling_steps)


def masked_after(step: int, num_iter: int, seq_len: int, schedule: str) -> int:
    """Tokens the mask schedule leaves masked after AR step `step` (before the at-least-one rules)."""
    r = (step + 1) / num_iter
    share = math.cos(math.pi / 2 * r) if schedule == "cosine" else 1.0 - r
    return math.floor(seq_len * share)


def cfg_at_step(settings: ContinuousSamplingConfig, step: int, num_iter: int, next_len: int, seq_len: int) -> float:
    """The CFG scale of AR step `step` (1.0: unguided, the unconditional half is skipped)."""
    cfg = settings.cfg_scale
    if settings.cfg_schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - next_len) / seq_len
    if settings.cfg_schedule == "interval-ar":
        return cfg if settings.cfg_interval_low <= step / num_iter <= settings.cfg_interval_high else 1.0
    return cfg  # constant; interval-noise: the head applies its window


@torch.no_grad()
def sample_latents(model: MAR, labels: torch.Tensor | None, codes: torch.Tensor | None = None,
                   settings: ContinuousSamplingConfig | None = None, *, batch: int | None = None,
                   generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """Scaled latents [B, C, h, w] (float32) for class labels [B] (None: unconditional, then give `batch`)
    and, for a fused model, discrete codes [B, code_size**2], with the stage-2 `settings` (default: MAR's).
    Deterministic for a given generator. `progress`, if given, is called with (step, num_iter) after each step."""
    settings = settings or ContinuousSamplingConfig()
    check_settings(settings, model)
    if labels is None and batch is None:
        raise UserError("give class labels, or the batch size for unconditional sampling")
    bsz = labels.shape[0] if labels is not None else batch
    device = model.class_emb.weight.device
    if labels is not None:
        labels = labels.to(device)
        model.check_labels(labels, bsz)
    if codes is not None:
        codes = codes.to(device)
    model.check_codes(codes, bsz)

    was_training = model.training
    model.eval()
    try:
        seq_len = model.cfg.seq_len
        num_iter = min(settings.num_iter, seq_len)
        may_guide = settings.cfg_scale != 1.0
        ctx = model.memory_kv(model.code_context(codes))  # crossattn: keys/values once, on the un-doubled batch
        class_emb = model.class_embedding(labels, bsz)
        class_emb2 = torch.cat([class_emb, model.fake_latent.expand(bsz, -1)]) if may_guide else None
        ctx2 = None if ctx is None or not may_guide else ctx.doubled()
        tokens = torch.zeros(bsz, seq_len, model.cfg.token_dim, device=device)
        mask = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
        orders = model.sample_orders(bsz, device, generator)
        for step in range(num_iter):
            remaining = int(mask[0].sum())
            next_len = max(1, min(remaining - 1, masked_after(step, num_iter, seq_len, settings.mask_schedule)))
            if step == num_iter - 1:
                next_mask = torch.zeros_like(mask)
            else:
                next_mask = torch.zeros_like(mask).scatter(1, orders[:, :next_len], True)
            scale = cfg_at_step(settings, step, num_iter, next_len, seq_len)
            guided = may_guide and scale != 1.0
            if guided:
                enc_mask = torch.cat([mask, mask])
                z = model.decode(model.encode(torch.cat([tokens, tokens]), enc_mask, class_emb2, ctx2), enc_mask, ctx2)
            else:
                z = model.decode(model.encode(tokens, mask, class_emb, ctx), mask, ctx)
            to_predict = mask & ~next_mask
            if to_predict.any():
                z_uncond = z[bsz:][to_predict] if guided else None
                tokens[to_predict] = model.diffloss.sample(z[:bsz][to_predict], settings, scale, z_uncond, generator)
            mask = next_mask
            if progress is not None:
                progress(step + 1, num_iter)
        return model.unpatchify(tokens)
    finally:
        model.train(was_training)

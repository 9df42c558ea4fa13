"""Sampling latents with MAR's iterative schedule.

All tokens start masked and each sample gets a random order. At step k of `num_iter`, the encoder and
decoder see the tokens generated so far; the next step keeps floor(L * cos(pi/2 * (k+1) / num_iter))
tokens masked (at least one, and at least one fewer than now), and the tokens leaving the mask are drawn
by the diffusion head; the last step draws all that remain. CFG runs the conditional and unconditional
(`fake_latent`) halves in one batch; its scale is constant or grows linearly with the share of tokens
generated (`linear`, as MAR, after Muse). The discrete codes, if any, condition both halves.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from d2ctool.continuous.model import MAR
from d2ctool.errors import UserError


@torch.no_grad()
def sample_latents(model: MAR, labels: torch.Tensor | None, codes: torch.Tensor | None = None, *,
                   batch: int | None = None, num_iter: int = 64, cfg: float = 1.0,
                   cfg_schedule: Literal["linear", "constant"] = "linear", temperature: float = 1.0,
                   clip_x0: float = 0.0, generator: torch.Generator | None = None, progress=None) -> torch.Tensor:
    """Scaled latents [B, C, h, w] (float32) for class labels [B] (None: unconditional, then give `batch`)
    and, for a fused model, discrete codes [B, code_size**2]. Deterministic for a given generator.
    clip_x0 > 0 bounds the diffusion head's predicted x0 (see `DiffusionHead.sample`).
    `progress`, if given, is called with (step, num_iter) after each step."""
    if cfg_schedule not in ("linear", "constant"):
        raise UserError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    if num_iter < 1:
        raise UserError(f"num_iter must be at least 1, got {num_iter}")
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
        seq_len, guided = model.cfg.seq_len, cfg != 1.0
        ctx = model.memory_kv(model.code_context(codes))  # crossattn: keys/values once, on the un-doubled batch
        class_emb = model.class_embedding(labels, bsz)
        if guided:
            class_emb = torch.cat([class_emb, model.fake_latent.expand(bsz, -1)])
            ctx = None if ctx is None else ctx.doubled()
        tokens = torch.zeros(bsz, seq_len, model.cfg.token_dim, device=device)
        mask = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
        orders = model.sample_orders(bsz, device, generator)
        for step in range(num_iter):
            enc_tokens, enc_mask = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = model.decode(model.encode(enc_tokens, enc_mask, class_emb, ctx), enc_mask, ctx)

            remaining = int(mask[0].sum())
            next_len = max(1, min(remaining - 1, math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))))
            if step == num_iter - 1:
                next_mask = torch.zeros_like(mask)
            else:
                next_mask = torch.zeros_like(mask).scatter(1, orders[:, :next_len], True)
            to_predict = mask & ~next_mask
            scale = cfg if cfg_schedule == "constant" else 1 + (cfg - 1) * (seq_len - next_len) / seq_len
            if to_predict.any():
                z_cond = z[:bsz][to_predict]
                z_uncond = z[bsz:][to_predict] if guided else None
                tokens[to_predict] = model.diffloss.sample(z_cond, temperature, scale, z_uncond, generator, clip_x0)
            mask = next_mask
            if progress is not None:
                progress(step + 1, num_iter)
        return model.unpatchify(tokens)
    finally:
        model.train(was_training)

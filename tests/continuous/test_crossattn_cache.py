"""Fusion crossattn: sampling computes each block's keys/values of the code memory once per run."""

from __future__ import annotations

import torch

from d2ctool.continuous.load import build_mar, preset_config
from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.continuous.sample import sample_latents


def test_memory_keys_and_values_are_computed_once_on_the_undoubled_batch(monkeypatch):
    torch.manual_seed(0)
    model = build_mar(preset_config("mar-tiny", {"fusion": "crossattn"})).eval()
    for p in model.parameters():  # MAR zero-initialises the cross-attention output: make it matter
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    labels, codes = torch.tensor([1, 3, 5]), torch.randint(0, model.cfg.code_vocab, (3, model.cfg.code_len))
    calls = []
    hooks = [b.cross_attn.kv.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
             for b in [*model.encoder_blocks, *model.decoder_blocks]]

    def run():
        return sample_latents(model, labels, codes, ContinuousSamplingConfig(num_iter=4, num_sampling_steps=4, cfg_scale=2.0), generator=torch.Generator().manual_seed(1))

    cached = run()
    blocks = model.cfg.encoder_depth + model.cfg.decoder_depth
    assert calls == [3] * blocks  # once per block and run, on the 3 conditional rows only
    calls.clear()
    monkeypatch.setattr(type(model), "memory_kv", lambda self, ctx: ctx)  # the old path: project at every step
    recomputed = run()
    assert calls == [6] * (blocks * 4)  # every step, on the CFG-doubled batch
    for h in hooks:
        h.remove()
    torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)
    assert cached.abs().sum() > 0

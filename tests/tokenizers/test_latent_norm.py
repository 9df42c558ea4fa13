"""Latent normalisation: the two rules, their inverse, LightningDiT's statistics (file and computed)."""

from __future__ import annotations

import pytest
import torch

from d2ctool.errors import UserError
from d2ctool.tokenizers.latent_norm import LatentNorm, channel_stats, from_manifest, load_stats, save_stats


def test_scale_and_channel_rules_and_their_round_trip():
    torch.manual_seed(0)
    z = torch.randn(3, 4, 5, 5) * 3 + 2
    scale = LatentNorm.scalar(0.2325)
    assert torch.allclose(scale.apply(z), z * 0.2325)
    mean, std = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 2.0, 1.0, 4.0])
    channel = LatentNorm.per_channel(mean.view(1, 4, 1, 1), std.view(1, 4, 1, 1), "test")
    for c in range(4):
        assert torch.allclose(channel.apply(z)[:, c], (z[:, c] - mean[c]) / std[c])
    for norm in (scale, channel):
        assert torch.allclose(norm.invert(norm.apply(z)), z, atol=1e-5)
        assert LatentNorm.from_record(norm.record()) == norm  # manifests keep it exactly
    with pytest.raises(UserError, match="have 4 channels, the latents 3"):
        channel.apply(z[:, :3])
    with pytest.raises(UserError, match="std must be positive"):
        LatentNorm.per_channel([0.0], [0.0])
    assert from_manifest({"scale_factor": 0.5}) == LatentNorm.scalar(0.5, "encode manifest scale_factor")


def test_channel_stats_match_torch_over_uneven_batches():
    torch.manual_seed(0)
    scale, shift = torch.tensor([1.0, 0.01, 5.0]).view(1, 3, 1, 1), torch.tensor([100.0, -3.0, 0.0]).view(1, 3, 1, 1)
    z = torch.randn(37, 3, 4, 4) * scale + shift  # a large mean beside a tiny spread
    mean, std, count = channel_stats(iter([z[:5], z[5:6], z[6:]]))
    flat = z.double().transpose(0, 1).reshape(3, -1)
    assert count == 37 * 16
    assert torch.allclose(mean.double(), flat.mean(1), rtol=1e-6)
    assert torch.allclose(std.double(), flat.std(1, unbiased=True), rtol=1e-5)  # LightningDiT: torch's unbiased std


def test_lightningdit_stats_file(tmp_path):
    path = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.arange(4.0).view(1, 4, 1, 1), "std": torch.full((1, 4, 1, 1), 2.0)}, path)
    norm = load_stats(path, 4)
    assert norm.kind == "channel" and norm.mean == (0.0, 1.0, 2.0, 3.0) and norm.std == (2.0,) * 4
    assert str(path.resolve()) in norm.source
    with pytest.raises(UserError, match="'mean' has 4 values, but the KL tokenizer has 8 latent channels"):
        load_stats(path, 8)
    torch.save({"mean": torch.zeros(4)}, path)
    with pytest.raises(UserError, match="missing std"):
        load_stats(path, 4)
    save_stats(tmp_path / "again.pt", norm)
    again = torch.load(tmp_path / "again.pt")
    assert again["mean"].shape == (1, 4, 1, 1) and load_stats(tmp_path / "again.pt", 4).mean == norm.mean

"""The KL tokenizer: LDM's AutoencoderKL as used by MAR and by LightningDiT (VA-VAE).

Preset `kl-16` has exactly the state dict of MAR's `AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4))`
(`kl16.ckpt` loads strictly); preset `vavae-f16d32` that of LightningDiT's VA-VAE (32 channels, level
attention at 16 px in encoder and decoder). Images in [-1, 1] -> posterior moments [B, 2C, h, w] (mean,
then log-variance clamped to [-30, 20]) -> latents -> images. What stage 2 models is the latent mapped
by a `LatentNorm` (tokenizers/latent_norm.py); `latent_norm` says which rule the tokenizer's latents
use by default, `scale_factor` is the factor of the scalar rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from d2ctool.config import bounded
from d2ctool.tokenizers.blocks import Decoder, Encoder
from d2ctool.tokenizers.latent_norm import LatentNorm

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class KLConfig:
    embed_dim: int = bounded(16, min=1)  # latent channels C
    ch: int = bounded(128, min=32)
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = bounded(2, min=1)
    encoder_attn_levels: list[int] = field(default_factory=lambda: [4])  # MAR: resolution 16 of 256 = level 4
    decoder_attn_levels: list[int] = field(default_factory=list)  # MAR's release: none
    latent_norm: Literal["scale", "channel"] = "scale"  # channel: per-channel statistics, computed by encode
    scale_factor: float = 0.2325  # the factor of the scalar rule
    dropout: float = 0.0

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class AutoencoderKL(nn.Module):
    architecture = "ldm-kl"

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.encoder_attn_levels, 2 * c, cfg.dropout, "ldm")
        self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.decoder_attn_levels, c, cfg.dropout, "ldm")
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> moments [B, 2C, H/stride, W/stride]: mean, clamped log-variance."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return torch.cat([mean, logvar.clamp(*LOGVAR_RANGE)], dim=1)

    def scale_norm(self) -> LatentNorm:
        """The scalar rule with this tokenizer's factor (tokenizer training, and MAR's official stage 2)."""
        return LatentNorm.scalar(self.cfg.scale_factor, "tokenizer scale_factor")

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None,
                             sample: bool = True, norm: LatentNorm | None = None) -> torch.Tensor:
        """A posterior sample (or the mean), normalised by `norm` (default: the scale factor): what stage 2 models."""
        noise = None
        if sample:
            noise = torch.randn(moments.shape[0], moments.shape[1] // 2, *moments.shape[2:], generator=generator,
                                device=moments.device)
        return (norm or self.scale_norm()).apply(posterior_latents(moments, noise))

    def decode_latents(self, latents: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
        """Normalised latents (as stage 2 produces them) -> images; `norm` as in `latents_from_moments`."""
        return self.decoder(self.post_quant_conv((norm or self.scale_norm()).invert(latents)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction from a posterior sample, moments): the training pass."""
        moments = self.encode_moments(images)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decoder(self.post_quant_conv(z)), moments


def posterior_kl(moments: torch.Tensor) -> torch.Tensor:
    """KL(posterior || N(0, I)), summed over latent elements, averaged over the batch."""
    mean, logvar = moments.float().chunk(2, dim=1)
    return 0.5 * torch.sum(mean**2 + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3]).mean()


def posterior_latents(moments: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """mean + exp(logvar / 2) * noise (a posterior sample), or the mean without noise; float32.

    Stage-2 training calls it on stored moments and then applies the encode manifest's `LatentNorm`.
    """
    mean, logvar = moments.float().chunk(2, dim=1)
    if noise is not None:
        mean = mean + torch.exp(0.5 * logvar) * noise
    return mean


PRESETS = {
    "kl-16": KLConfig(),  # MAR kl16
    "kl-tiny-s4": KLConfig(embed_dim=4, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, encoder_attn_levels=[2],
                           scale_factor=1.0),
    "kl-tiny-s8": KLConfig(embed_dim=4, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, encoder_attn_levels=[3],
                           scale_factor=1.0),
    # LightningDiT vavae-imagenet256-f16d32-dinov2.pt; its latents are normalised per channel
    "vavae-f16d32": KLConfig(embed_dim=32, decoder_attn_levels=[4], latent_norm="channel", scale_factor=1.0),
    "vavae-tiny-s4": KLConfig(embed_dim=8, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, encoder_attn_levels=[2],
                              decoder_attn_levels=[2], latent_norm="channel", scale_factor=1.0),
}

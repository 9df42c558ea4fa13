"""The VQ tokenizer: LlamaGen's VQ model (taming-style conv autoencoder + l2-normalised codebook).

Preset `vq-16` has exactly the state dict of LlamaGen's `VQ_16` (`vq_ds16_c2i.pt` loads strictly).
Images in [-1, 1] -> code indices [B, h, w] (flat index = row-major over h, w) -> images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d2ctool.config import bounded
from d2ctool.tokenizers.blocks import Decoder, Encoder
from d2ctool.tokenizers.quantize import nearest_code_indices, nearest_codes


@dataclass
class VQConfig:
    codebook_size: int = bounded(16384, min=2)
    codebook_dim: int = bounded(8, min=1)
    ch: int = bounded(128, min=32)  # base width; GroupNorm(32) needs multiples of 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = bounded(2, min=1)
    z_channels: int = bounded(256, min=1)
    dropout: float = 0.0
    commit_beta: float = 0.25  # commitment loss weight (training)
    usage_window: int = bounded(65536, min=1)  # recent code indices kept in `quantize.codebook_used`

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class VectorQuantizer(nn.Module):
    def __init__(self, size: int, dim: int, usage_window: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        self.embedding.weight.data = F.normalize(self.embedding.weight.data.uniform_(-1 / size, 1 / size), dim=-1)
        self.register_buffer("codebook_used", torch.zeros(usage_window))  # name and size as in LlamaGen

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes for vectors z [N, dim], both sides l2-normalised (float32)."""
        return nearest_code_indices(F.normalize(z.float(), dim=-1), self.codebook())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] -> quantised latents [B, dim, h, w]."""
        return self.codebook()[indices].permute(0, 3, 1, 2)


class VQModel(nn.Module):
    architecture = "llamagen-vq"

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        last = [len(cfg.ch_mult) - 1]  # attention at the lowest resolution, in encoder and decoder
        self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, last, cfg.z_channels, cfg.dropout, "llamagen")
        self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, last, cfg.z_channels, cfg.dropout, "llamagen")
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.usage_window)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latent [B, codebook_dim, h, w]."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> code indices [B, H/stride, W/stride]."""
        return nearest_codes(self.quantize, self.encode_latent(images))

    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] -> images [B, 3, h*stride, w*stride] (about [-1, 1])."""
        return self.decode_latent(self.quantize.lookup(indices))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruction through the codebook with the straight-through estimator.

        Returns (reconstruction, indices [B, h, w], aux) where aux holds LlamaGen's codebook loss
        mean((z_q - sg[z])^2), the commitment loss beta * mean((sg[z_q] - z)^2) (z l2-normalised),
        and the detached normalised latents [B*h*w, dim] (for restarting dead codes).
        """
        z = self.encode_latent(images)
        b, d, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        with torch.autocast(z.device.type, enabled=False):
            indices = self.quantize.nearest(z.reshape(-1, d).float()).view(b, h, w)
        z_q = self.quantize.codebook()[indices].to(z.dtype)
        aux = {"codebook": torch.mean((z_q - z.detach()) ** 2),
               "commit": self.cfg.commit_beta * torch.mean((z_q.detach() - z) ** 2),
               "latents": z.detach().reshape(-1, d)}
        z_q = z + (z_q - z).detach()
        return self.decode_latent(z_q.permute(0, 3, 1, 2)), indices, aux


PRESETS = {
    "vq-16": VQConfig(),  # LlamaGen VQ_16
    "vq-8": VQConfig(ch_mult=[1, 2, 2, 4]),  # LlamaGen VQ_8
    "vq-tiny-s4": VQConfig(codebook_size=512, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=32,
                           usage_window=4096),
    "vq-tiny-s8": VQConfig(codebook_size=512, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=32,
                           usage_window=4096),
}

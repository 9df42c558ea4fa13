"""The MaskGIT VQGAN tokenizer, as released in bytedance/1d-tokenizer (the codes RAR generates).

Preset `maskgit-f16` has exactly the state dict of `maskgit-vqgan-imagenet-f16-256.bin` (a bare state
dict, loaded strictly): a conv encoder/decoder without attention, average-pool downsampling, no
quant_conv (the encoder's last conv emits the 256-d code space) and a plain codebook of 1024 x 256
searched by squared Euclidean distance (no l2 normalisation).

Two facts of the released weights are reproduced exactly:
- a residual block that changes width adds `nin_shortcut` applied to its *own output*, h + W h, not
  to its input (the open-muse port did this and the weights were converted that way);
- the network sees images in [0, 1] and its decoder output is clamped to [0, 1]. This class takes and
  returns images in [-1, 1] like every other tokenizer here and converts at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d2ctool.config import bounded
from d2ctool.tokenizers.blocks import normalize, run_checkpointed
from d2ctool.tokenizers.quantize import nearest_code_indices, nearest_codes


@dataclass
class MaskGITConfig:
    codebook_size: int = bounded(1024, min=2)
    codebook_dim: int = bounded(256, min=1)  # also the encoder's output width: there is no quant_conv
    ch: int = bounded(128, min=32)  # base width; GroupNorm(32) needs multiples of 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = bounded(2, min=1)  # per level, and in each middle stack
    dropout: float = 0.0
    commit_beta: float = 0.25  # official commitment_cost; it weights the codebook term (see MaskGITVQ.forward)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _conv(cin: int, cout: int, k: int, bias: bool) -> nn.Conv2d:
    # the official Conv2dSame at stride 1 and odd k is exactly symmetric padding (k - 1) / 2
    return nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=bias)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice, bias-free; a width change adds nin_shortcut(h) to h (the released quirk)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = _conv(in_channels, out_channels, 3, bias=False)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = _conv(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x)


class Level(nn.Module):
    """`num_blocks` residual blocks at one resolution, then an optional 2x average pool or 2x upsample+conv."""

    def __init__(self, cin: int, cout: int, num_blocks: int, dropout: float, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, dropout) for i in range(num_blocks))
        self.resample = resample
        if resample == "up":
            self.upsample_conv = _conv(cout, cout, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


def _stack(channels: int, n: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(channels, channels, dropout) for _ in range(n))


class Encoder(nn.Module):
    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = _conv(3, ch, 3, bias=False)
        widths = [ch] + [ch * m for m in mult]
        self.down = nn.ModuleList(Level(widths[i], widths[i + 1], n, cfg.dropout, "down" if i < len(mult) - 1 else None)
                                  for i in range(len(mult)))
        self.mid = _stack(widths[-1], n, cfg.dropout)
        self.norm_out = normalize(widths[-1])
        self.conv_out = _conv(widths[-1], cfg.codebook_dim, 1, bias=True)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for layer in (*self.down, *self.mid):
            h = run_checkpointed(layer, h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """`up` is stored by resolution level (up.0 is the full resolution) and run from the last level down."""

    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        top = ch * mult[-1]
        self.conv_in = _conv(cfg.codebook_dim, top, 3, bias=True)
        self.mid = _stack(top, n, cfg.dropout)
        self.up = nn.ModuleList(Level(ch * mult[min(i + 1, len(mult) - 1)], ch * mult[i], n, cfg.dropout,
                                      "up" if i > 0 else None) for i in range(len(mult)))
        self.norm_out = normalize(ch * mult[0])
        self.conv_out = _conv(ch * mult[0], 3, 3, bias=True)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in (*self.mid, *reversed(self.up)):
            h = run_checkpointed(layer, h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Plain codebook: nearest code by squared Euclidean distance, the first index winning a tie."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes for vectors z [N, dim] (float32): argmin of |z|^2 + |e|^2 - 2 z.e."""
        return nearest_code_indices(z, self.embedding.weight)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] -> code vectors [B, dim, h, w]."""
        return self.embedding.weight[indices].permute(0, 3, 1, 2)


class MaskGITVQ(nn.Module):
    """Same interface as `VQModel`: images in [-1, 1] <-> code indices [B, h, w] (row-major flat order)."""

    architecture = "maskgit-vq"

    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim)

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantisation latent [B, dim, h, w] (the network itself sees [0, 1])."""
        return self.encoder((images + 1) / 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> code indices [B, H/stride, W/stride]."""
        return nearest_codes(self.quantize, self.encode_latent(images))

    def decode_latent(self, quant: torch.Tensor) -> torch.Tensor:
        """Code vectors -> images in [-1, 1]: the official wrapper clamps the [0, 1] output."""
        return self.decoder(quant).clamp(0.0, 1.0) * 2 - 1

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] -> images [B, 3, h*stride, w*stride] in [-1, 1]."""
        return self.decode_latent(self.quantize.lookup(indices))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruction through the codebook with the straight-through estimator (training).

        Returns (reconstruction in [-1, 1], indices [B, h, w], aux) with the official `VectorQuantizer`
        loss, whose weights are the reverse of VQ-VAE's: mean((sg[z_q] - z)^2) at weight 1 pulls the
        encoder, beta * mean((z_q - sg[z])^2) the codebook; and the detached latents [B*h*w, dim] (for
        restarting dead codes). The reconstruction is not clamped, so it keeps gradients.
        """
        z = self.encode_latent(images).permute(0, 2, 3, 1)
        b, h, w, d = z.shape
        with torch.autocast(z.device.type, enabled=False):
            indices = self.quantize.nearest(z.reshape(-1, d)).view(b, h, w)
        z_q = self.quantize.embedding.weight[indices].to(z.dtype)
        aux = {"codebook": self.cfg.commit_beta * torch.mean((z_q - z.detach()) ** 2),
               "commit": torch.mean((z_q.detach() - z) ** 2),
               "latents": z.detach().reshape(-1, d)}
        z_q = z + (z_q - z).detach()
        return self.decoder(z_q.permute(0, 3, 1, 2)) * 2 - 1, indices, aux


PRESETS = {
    "maskgit-f16": MaskGITConfig(),  # bytedance/1d-tokenizer maskgit-vqgan-imagenet-f16-256.bin
    "maskgit-tiny-s4": MaskGITConfig(codebook_size=256, codebook_dim=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1),
}

"""Convolutional building blocks shared by the VQ and KL autoencoders (taming / LDM family).

Parameter names (norm1, conv1, nin_shortcut, q, k, v, proj_out, ...) are those of the official
checkpoints, so both tokenizers load them as they are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_checkpointed(module: nn.Module, x: torch.Tensor, on: bool) -> torch.Tensor:
    """module(x); with `on` (an encoder's or decoder's `gradient_checkpointing`, set by the trainer) its
    activations are recomputed in backward instead of kept."""
    if on and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the asymmetric (right/bottom) zero padding of the official models."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention when `attention` is set.

    The residual list is called `res` in LlamaGen's checkpoints and `block` in LDM's (`blocks_name`).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float,
                 blocks_name: str):
        super().__init__()
        self.blocks_name = blocks_name
        setattr(self, blocks_name, nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_blocks)))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self.blocks_name)):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


def _middle(channels: int, dropout: float, naming: str) -> nn.Sequential:
    """ResnetBlock, AttnBlock, ResnetBlock: keys mid.0/1/2 (LlamaGen) or mid.block_1/attn_1/block_2 (LDM)."""
    layers = [ResnetBlock(channels, channels, dropout), AttnBlock(channels), ResnetBlock(channels, channels, dropout)]
    if naming == "llamagen":
        return nn.Sequential(*layers)
    return nn.Sequential(OrderedDict(zip(("block_1", "attn_1", "block_2"), layers)))


class Encoder(nn.Module):
    """Image -> feature map at 1/2^(len(ch_mult)-1) resolution with `out_channels` channels.

    `naming` selects the state-dict layout of the official checkpoints: "llamagen" (VQ) or "ldm" (KL).
    """

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, attn_levels: list[int], out_channels: int,
                 dropout: float, naming: str):
        super().__init__()
        self.levels_name = "conv_blocks" if naming == "llamagen" else "down"
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, channels = nn.ModuleList(), ch
        for i, mult in enumerate(ch_mult):
            level = Level(channels, ch * mult, num_res_blocks, i in attn_levels, dropout,
                          "res" if naming == "llamagen" else "block")
            channels = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(channels)
            levels.append(level)
        setattr(self, self.levels_name, levels)
        self.mid = _middle(channels, dropout, naming)
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in getattr(self, self.levels_name):
            h = run_checkpointed(level, h, self.gradient_checkpointing)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Feature map with `in_channels` channels -> image, mirroring Encoder (one more block per level).

    LlamaGen lists levels in processing order (`conv_blocks.0` is the lowest resolution); LDM indexes
    them by resolution level (`up.0` is the highest resolution, processed last).
    """

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, attn_levels: list[int], in_channels: int,
                 dropout: float, naming: str):
        super().__init__()
        self.naming = naming
        channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.mid = _middle(channels, dropout, naming)
        processing = []
        for i in reversed(range(len(ch_mult))):
            level = Level(channels, ch * ch_mult[i], num_res_blocks + 1, i in attn_levels, dropout,
                          "res" if naming == "llamagen" else "block")
            channels = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(channels)
            processing.append(level)
        if naming == "llamagen":
            self.conv_blocks = nn.ModuleList(processing)
        else:
            self.up = nn.ModuleList(reversed(processing))
        self.norm_out = normalize(channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in (self.conv_blocks if self.naming == "llamagen" else reversed(self.up)):
            h = run_checkpointed(level, h, self.gradient_checkpointing)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

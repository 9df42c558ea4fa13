"""Recipe section `tokenizers`: which VQ and KL tokenizer every stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from d2ctool.config import bounded, nested


@dataclass
class VQSpec:
    preset: str = "vq-16"  # architecture of an official checkpoint; our own checkpoints carry theirs
    checkpoint: str | None = None  # LlamaGen's vq_ds16_c2i.pt, or a `d2c train-tokenizer` output


@dataclass
class KLSpec:
    preset: str = "kl-16"
    checkpoint: str | None = None  # MAR's kl16.ckpt, or a `d2c train-tokenizer` output


@dataclass
class TokenizersConfig:
    vq: VQSpec = nested(VQSpec)
    kl: KLSpec = nested(KLSpec)


@dataclass
class EncodeConfig:
    """Recipe section `encode`: image shards -> per-image VQ codes and KL posterior moments."""

    resolution: int = bounded(256, min=8)  # ADM center crop size
    batch_size: int = bounded(64, min=1)  # images per forward pass (each also encoded h-flipped)
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast on GPU; the CPU always runs fp32
    moments_dtype: Literal["float16", "float32"] = "float16"
    loader_threads: int = bounded(8, min=1)  # threads decoding and cropping images
    device: str | None = None  # default: the local GPU under torchrun, else cuda if present, else cpu

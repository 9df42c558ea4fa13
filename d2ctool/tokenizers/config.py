"""Recipe section `tokenizers`: which VQ and KL tokenizer every stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from d2ctool.config import bounded, nested
from d2ctool.tokenizers.latent_norm import STATS_IMAGES
from d2ctool.training.config import TrainConfig


@dataclass
class VQSpec:
    preset: str = "vq-16"  # architecture of an official checkpoint (vq-16, maskgit-f16); our own carry theirs
    checkpoint: str | None = None  # LlamaGen's vq_ds16_c2i.pt, MaskGIT's .bin, or a `d2c train-tokenizer` output


@dataclass
class KLSpec:
    preset: str = "kl-16"  # kl-16 (MAR) or vavae-f16d32 (LightningDiT's VA-VAE)
    checkpoint: str | None = None  # MAR's kl16.ckpt, VA-VAE's .pt, or a `d2c train-tokenizer` output


@dataclass
class TokenizersConfig:
    vq: VQSpec = nested(VQSpec)
    kl: KLSpec = nested(KLSpec)


@dataclass
class EncodeConfig:
    """Recipe section `encode`: image shards -> per-image VQ codes and KL posterior moments."""

    resolution: int = bounded(256, min=8)  # ADM center crop size
    # which views of each image are encoded (data/encoded.py VIEWS): flip = the crop and its h-flip (MAR,
    # LlamaGen's default); ten-crop = LlamaGen's published --ten-crop: the four corners and the centre of an
    # ADM crop `crop_range` times larger, and the same of its h-flip (5x the storage of flip)
    views: Literal["flip", "ten-crop"] = "flip"
    crop_range: float = bounded(1.1, min=1.0)  # ten-crop only: the larger crop is int(resolution * crop_range)
    batch_size: int = bounded(64, min=1)  # images per forward pass (each encoded in every view)
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast on GPU; the CPU always runs fp32
    moments_dtype: Literal["float16", "float32"] = "float16"
    # how stage 2 normalises the latents: auto = the KL tokenizer's rule (kl-16: scale, vavae-*: channel)
    latent_norm: Literal["auto", "scale", "channel"] = "auto"
    latent_stats: str | None = None  # channel: LightningDiT's latents_stats.pt; None: computed after encoding
    stats_images: int = bounded(STATS_IMAGES, min=2)  # channel statistics from up to this many random images
    seed: int = 0  # which images (and posterior noise) the statistics use
    loader_threads: int = bounded(8, min=1)  # threads decoding and cropping images
    device: str | None = None  # default: the local GPU under torchrun, else cuda if present, else cpu


@dataclass
class TokenizerTrainingConfig:
    """Recipe section `tokenizer_training`: `d2c train-tokenizer vq|kl` on small or custom data.

    Reconstruction loss (L1 + L2) plus, for VQ, codebook and commitment losses with restarts of dead
    codes, and for KL a small KL weight. No perceptual or adversarial loss: ImageNet users load the
    official tokenizers instead.
    """

    vq_preset: str = "vq-tiny-s4"
    kl_preset: str = "kl-tiny-s4"
    codebook_size: int | None = None  # overrides the VQ preset's
    latent_channels: int | None = None  # overrides the KL preset's embed_dim
    scale_factor: float | None = None  # latent scale; None: fitted at the end, 1 / std of the latents (LDM)
    resolution: int = bounded(64, min=8)  # ADM center crop of the training images
    val: str | None = None  # held-out image shards for the final PSNR (default: the training shards)
    val_images: int = bounded(256, min=1)
    l1_weight: float = bounded(1.0, min=0.0)
    l2_weight: float = bounded(1.0, min=0.0)
    kl_weight: float = bounded(1e-6, min=0.0)
    dead_code_steps: int = bounded(50, min=1)  # a code unused this many steps is moved onto a recent latent
    train: TrainConfig = nested(TrainConfig)

"""Recipe section `tokenizers`: which VQ and KL tokenizer every stage uses."""

from __future__ import annotations

from dataclasses import dataclass

from d2ctool.config import nested


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

"""Stage-1 model configs (LlamaGen's GPT, RAR), their presets, and the recipe section `discrete`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from d2ctool.config import bounded, nested
from d2ctool.errors import UserError
from d2ctool.training.config import TrainConfig


@dataclass
class GPTConfig:
    dim: int = bounded(768, min=8)
    n_layer: int = bounded(12, min=1)
    n_head: int = bounded(12, min=1)
    vocab_size: int = bounded(16384, min=2)  # = the VQ codebook size
    num_classes: int = bounded(1000, min=1)
    grid: int = bounded(16, min=1)  # token grid side: N = grid * grid codes per image
    class_dropout: float = bounded(0.1, min=0.0, max=1.0)  # labels -> null class, for CFG
    token_dropout: float = bounded(0.1, min=0.0, max=1.0)
    attn_dropout: float = bounded(0.0, min=0.0, max=1.0)
    resid_dropout: float = bounded(0.1, min=0.0, max=1.0)
    ffn_dropout: float = bounded(0.1, min=0.0, max=1.0)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    multiple_of: int = bounded(256, min=1)  # SwiGLU hidden size rounds up to a multiple of this

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    def check(self) -> None:
        if self.dim % self.n_head or (self.dim // self.n_head) % 4:
            raise UserError(f"discrete model: dim {self.dim} must split into {self.n_head} heads whose size is a "
                            "multiple of 4 (2-D RoPE rotates pairs in two halves)")


PRESETS = {
    "gpt-b": GPTConfig(dim=768, n_layer=12, n_head=12),
    "gpt-l": GPTConfig(dim=1024, n_layer=24, n_head=16),
    "gpt-xl": GPTConfig(dim=1280, n_layer=36, n_head=20),
    "gpt-tiny": GPTConfig(dim=128, n_layer=4, n_head=4, multiple_of=32),
}


@dataclass
class RARConfig:
    """RAR (bytedance/1d-tokenizer modeling/rar.py): adaLN-Zero blocks with QK-norm over one shared table of
    image-token, mask, class and null-class embeddings, with learned and target-aware position tables."""

    dim: int = bounded(768, min=8)
    n_layer: int = bounded(24, min=1)
    n_head: int = bounded(16, min=1)
    mlp_dim: int = bounded(3072, min=1)
    vocab_size: int = bounded(1024, min=2)  # = the VQ codebook size
    num_classes: int = bounded(1000, min=1)
    grid: int = bounded(16, min=1)  # token grid side: N = grid * grid codes per image
    class_dropout: float = bounded(0.1, min=0.0, max=1.0)
    attn_dropout: float = bounded(0.1, min=0.0, max=1.0)
    resid_dropout: float = bounded(0.1, min=0.0, max=1.0)  # after the attention projection
    ffn_dropout: float = bounded(0.1, min=0.0, max=1.0)  # after the MLP's activation and its output
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def check(self) -> None:
        if self.dim % self.n_head:
            raise UserError(f"discrete model: dim {self.dim} must split into {self.n_head} heads")


RAR_PRESETS = {  # README_RAR.md; every size has 16 heads
    "rar-b": RARConfig(dim=768, n_layer=24, mlp_dim=3072),
    "rar-l": RARConfig(dim=1024, n_layer=24, mlp_dim=4096),
    "rar-xl": RARConfig(dim=1280, n_layer=32, mlp_dim=5120),
    "rar-xxl": RARConfig(dim=1408, n_layer=40, mlp_dim=6144),
    "rar-tiny": RARConfig(dim=64, n_layer=2, n_head=4, mlp_dim=256),
}

StageOneConfig = GPTConfig | RARConfig


def preset(name: str) -> StageOneConfig:
    """The architecture of a stage-1 preset: gpt-* (LlamaGen) or rar-* (RAR)."""
    presets = {**PRESETS, **RAR_PRESETS}
    if name not in presets:
        raise UserError(f"unknown discrete model preset '{name}'; choose one of {', '.join(presets)}")
    return replace(presets[name])


@dataclass
class SamplingConfig:
    """Stage-1 sampling knobs (LlamaGen's c2i defaults: CFG 4.0, top-k 2000), or a released preset."""

    preset: str | None = None  # rar-b|rar-l|rar-xl|rar-xxl: RAR's released settings replace every knob below
    cfg_scale: float = bounded(4.0, min=1.0)
    # "constant"; "linear": 1 -> cfg_scale over the token positions; "power-cosine" (RAR):
    # 1 + (cfg_scale - 1) * (1 - cos(pi * (t / N) ** cfg_power)) / 2 at step t of N (cfg_power 0 = constant)
    cfg_schedule: Literal["constant", "linear", "power-cosine"] = "constant"
    cfg_power: float = bounded(0.0, min=0.0)
    temperature: float = bounded(1.0, min=1e-5)
    top_k: int = bounded(2000, min=0)  # 0 = off
    top_p: float = bounded(1.0, min=0.0, max=1.0)  # 1.0 = off

    def resolved(self) -> SamplingConfig:
        """These settings with the preset's applied (the ones generation uses)."""
        if self.preset is None:
            if self.cfg_power and self.cfg_schedule != "power-cosine":
                raise UserError(f"stage1.cfg_power {self.cfg_power} is only used by cfg_schedule power-cosine, "
                                f"not {self.cfg_schedule}: set the schedule too, or leave cfg_power 0")
            return self
        if self.preset not in SAMPLING_PRESETS:
            raise UserError(f"unknown stage-1 sampling preset '{self.preset}'; choose one of "
                            f"{', '.join(SAMPLING_PRESETS)} or leave it null and set the knobs")
        return replace(SAMPLING_PRESETS[self.preset], preset=self.preset)


def _rar_release(cfg_scale: float, cfg_power: float, temperature: float) -> SamplingConfig:
    """RAR samples from the full distribution: no top-k, no top-p."""
    return SamplingConfig(None, cfg_scale, "power-cosine", cfg_power, temperature, top_k=0, top_p=1.0)


SAMPLING_PRESETS = {  # README_RAR.md, "Reproducing RAR-*": guidance_scale, guidance_scale_pow, randomize_temperature
    "rar-b": _rar_release(16.0, 2.75, 1.0),
    "rar-l": _rar_release(15.5, 2.5, 1.02),
    "rar-xl": _rar_release(6.9, 1.5, 1.02),
    "rar-xxl": _rar_release(8.0, 1.2, 1.02),
}


@dataclass
class PermutationConfig:
    """RAR training: each sample is in a random order with probability 1 until `anneal_start`, then the
    probability falls linearly to 0 at `anneal_end` and stays 0 (raster order). rar.yaml: 125k -> 187.5k of 250k."""

    anneal_start: int = bounded(125_000, min=0)
    anneal_end: int = bounded(187_500, min=0)

    def probability(self, step: int) -> float:
        """get_rar_random_ratio of the official training loop, at optimizer step `step` (0-based)."""
        if step < self.anneal_start:
            return 1.0
        if step >= self.anneal_end:
            return 0.0
        return 1.0 - (step - self.anneal_start) / (self.anneal_end - self.anneal_start)


@dataclass
class DiscreteConfig:
    """Recipe section `discrete`: the stage-1 model and its training run."""

    # preset: gpt-b|l|xl|tiny or rar-b|l|xl|xxl|tiny; vocab_size, num_classes and grid come from the encode manifest
    model: str = "gpt-b"
    class_dropout: float = bounded(0.1, min=0.0, max=1.0)
    token_dropout: float = bounded(0.1, min=0.0, max=1.0)
    resid_dropout: float = bounded(0.1, min=0.0, max=1.0)
    ffn_dropout: float = bounded(0.1, min=0.0, max=1.0)
    attn_dropout: float = bounded(0.1, min=0.0, max=1.0)  # RAR only (LlamaGen's GPT has none)
    permutation: PermutationConfig = nested(PermutationConfig)  # RAR only
    init: str | None = None  # an official c2i_*_256.pt / rar_*.bin or our checkpoint to start from
    data: str | None = None  # encoded shards (d2c encode output)
    out: str | None = None  # run folder
    train: TrainConfig = nested(TrainConfig)
    sampling: SamplingConfig = nested(SamplingConfig)
    grid_classes: int = bounded(8, min=1)  # periodic sample grid: classes x 4 samples

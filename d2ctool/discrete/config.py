"""Stage-1 model config, LlamaGen's presets, and the recipe section `discrete`."""

from __future__ import annotations

from dataclasses import dataclass, replace

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


def preset(name: str) -> GPTConfig:
    if name not in PRESETS:
        raise UserError(f"unknown discrete model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name])


@dataclass
class SamplingConfig:
    """Stage-1 sampling knobs (LlamaGen's c2i defaults: CFG 4.0, top-k 2000)."""

    cfg_scale: float = bounded(4.0, min=1.0)
    cfg_schedule: str = "constant"  # "constant", or "linear": 1 -> cfg_scale over the token positions
    temperature: float = bounded(1.0, min=1e-5)
    top_k: int = bounded(2000, min=0)  # 0 = off
    top_p: float = bounded(1.0, min=0.0, max=1.0)  # 1.0 = off


@dataclass
class DiscreteConfig:
    """Recipe section `discrete`: the stage-1 model and its training run."""

    model: str = "gpt-b"  # preset; vocab_size, num_classes and grid always come from the encode manifest
    class_dropout: float = bounded(0.1, min=0.0, max=1.0)
    token_dropout: float = bounded(0.1, min=0.0, max=1.0)
    resid_dropout: float = bounded(0.1, min=0.0, max=1.0)
    ffn_dropout: float = bounded(0.1, min=0.0, max=1.0)
    init: str | None = None  # an official c2i_*_256.pt or our checkpoint to start from
    data: str | None = None  # encoded shards (d2c encode output)
    out: str | None = None  # run folder
    train: TrainConfig = nested(TrainConfig)
    sampling: SamplingConfig = nested(SamplingConfig)
    grid_classes: int = bounded(8, min=1)  # periodic sample grid: classes x 4 samples

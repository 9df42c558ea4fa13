"""Architecture of the stage-2 model: MAR's encoder/decoder, its diffusion head, and the discrete-code fusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from d2ctool.config import ConfigError, bounded, nested
from d2ctool.training.config import TrainConfig

FUSIONS = ("none", "add", "prefix", "qformer", "crossattn")


@dataclass
class MARConfig:
    """Defaults are MAR's `mar_base` at 256 px on the kl-16 latents (16 channels, 16 x 16 grid)."""

    # the continuous latents: [B, latent_channels, latent_size, latent_size], cut into patch_size^2 tokens
    latent_channels: int = bounded(16, min=1)
    latent_size: int = bounded(16, min=1)
    patch_size: int = bounded(1, min=1)
    num_classes: int = bounded(1000, min=1)
    buffer_size: int = bounded(64, min=1)  # copies of the class embedding in front of the sequence

    encoder_dim: int = bounded(768, min=8)
    encoder_depth: int = bounded(12, min=1)
    encoder_heads: int = bounded(12, min=1)
    decoder_dim: int = bounded(768, min=8)
    decoder_depth: int = bounded(12, min=1)
    decoder_heads: int = bounded(12, min=1)
    mlp_ratio: float = bounded(4.0, min=0.25)
    attn_dropout: float = bounded(0.1, min=0.0, max=0.9)
    proj_dropout: float = bounded(0.1, min=0.0, max=0.9)
    grad_checkpointing: bool = False

    label_drop_prob: float = bounded(0.1, min=0.0, max=1.0)  # class -> fake_latent, for CFG
    mask_ratio_min: float = bounded(0.7, min=0.0, max=1.0)  # truncated Gaussian on [min, 1], mean 1, std 0.25

    # diffusion head: adaLN residual MLP, `diffloss_depth` blocks of width `diffloss_width`
    diffloss_depth: int = bounded(6, min=1)
    diffloss_width: int = bounded(1024, min=8)
    diffusion_steps: int = bounded(1000, min=2)  # training timesteps of the cosine schedule
    diffusion_batch_mul: int = bounded(4, min=1)  # each token's loss is taken on this many noise draws

    # discrete codes: [B, code_size * code_size] indices into a codebook of code_vocab entries
    fusion: Literal["none", "add", "prefix", "qformer", "crossattn"] = "none"
    code_vocab: int = bounded(16384, min=2)
    code_size: int = bounded(16, min=1)
    qformer_queries: int = bounded(32, min=1)
    qformer_depth: int = bounded(2, min=1)
    code_corrupt_prob: float = bounded(0.0, min=0.0, max=1.0)  # training only: codes replaced by random ones

    @property
    def seq_size(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_size**2

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def code_len(self) -> int:
        return self.code_size**2

    def validate(self) -> "MARConfig":
        """Relations between fields that single-field bounds cannot express."""
        if self.latent_size % self.patch_size:
            raise ConfigError(f"latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            if dim % heads:
                raise ConfigError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
        if self.fusion == "add" and self.code_size != self.seq_size:
            raise ConfigError(f"fusion 'add' adds one code embedding per token, so the code grid must equal the "
                              f"token grid: code_size is {self.code_size}, latent_size / patch_size is "
                              f"{self.seq_size}; use fusion prefix, qformer or crossattn for other grids")
        return self


# fields older checkpoints record in their architecture config that are sampling settings now
# (stage2.num_sampling_steps): dropped when such a checkpoint is read
RETIRED_FIELDS = ("num_sampling_steps",)

HEAD_SAMPLERS = ("ddpm", "ddim", "dpm-solver++")  # continuous/samplers/ holds one file each
MASK_SCHEDULES = ("cosine", "linear")
CFG_SCHEDULES = ("linear", "constant", "interval-ar", "interval-noise")


@dataclass
class ContinuousSamplingConfig:
    """Stage-2 sampling knobs, all chosen at sample time (MAR's defaults for mar-b: 64 AR steps, 100 DDPM steps
    of the head, linear CFG)."""

    num_iter: int = bounded(64, min=1)  # masked-AR steps (at most the token count; 1 = all tokens at once)
    mask_schedule: Literal[MASK_SCHEDULES] = "cosine"  # share of tokens still masked after each AR step
    sampler: Literal[HEAD_SAMPLERS] = "ddpm"  # the diffusion head's sampler (ddpm: MAR's, respaced)
    num_sampling_steps: int = bounded(100, min=2)  # network evaluations of the head per token
    eta: float = bounded(0.0, min=0.0, max=1.0)  # ddim only: 0 deterministic, 1 DDPM-like noise
    cfg_scale: float = bounded(2.9, min=1.0)
    # linear: grows with the share of tokens generated (MAR); constant; interval-ar / interval-noise: cfg_scale
    # only inside [cfg_interval_low, cfg_interval_high] of the AR progress (step / num_iter) or of the head's
    # noise level (timestep / diffusion_steps), no guidance (and no unconditional pass) outside
    cfg_schedule: Literal[CFG_SCHEDULES] = "linear"
    cfg_interval_low: float = bounded(0.0, min=0.0, max=1.0)
    cfg_interval_high: float = bounded(1.0, min=0.0, max=1.0)
    temperature: float = bounded(1.0, min=1e-3)  # scales the noise a stochastic head sampler injects
    # bound on the diffusion head's predicted x0 at every step, in scaled-latent units; 0 = off (MAR's
    # sampler, exact for official weights). A briefly trained head needs it: see DiffusionHead.sample.
    clip_x0: float = bounded(0.0, min=0.0)

    def validate(self) -> "ContinuousSamplingConfig":
        """Relations between fields that single-field bounds cannot express."""
        if self.cfg_interval_low > self.cfg_interval_high:
            raise ConfigError(f"cfg_interval_low {self.cfg_interval_low} exceeds cfg_interval_high "
                              f"{self.cfg_interval_high}")
        deterministic = self.sampler == "dpm-solver++" or (self.sampler == "ddim" and self.eta == 0)
        if deterministic and self.temperature != 1.0:
            raise ConfigError(f"temperature {self.temperature} scales the noise a stochastic head sampler injects, "
                              f"but {self.sampler}{' with eta 0' if self.sampler == 'ddim' else ''} injects none: use "
                              "sampler ddpm or ddim with eta > 0, or temperature 1")
        return self


@dataclass
class ContinuousConfig:
    """Recipe section `continuous`: the stage-2 model and its training run.

    The latent channels and grid, the code vocabulary and grid, and the classes come from the encode
    manifest; the preset gives the transformer and the diffusion head.
    """

    model: str = "mar-b"
    fusion: Literal["none", "add", "prefix", "qformer", "crossattn"] = "add"
    qformer_queries: int | None = None  # None: the preset's
    qformer_depth: int | None = None
    label_drop_prob: float | None = None
    diffusion_batch_mul: int | None = None
    code_corrupt_prob: float = bounded(0.0, min=0.0, max=1.0)  # robustness to stage-1 mistakes
    init: str | None = None  # MAR's mar_*.pth or one of our stage-2 checkpoints, for any fusion
    data: str | None = None  # encoded shards (d2c encode output)
    out: str | None = None  # run folder
    train: TrainConfig = nested(TrainConfig)
    sampling: ContinuousSamplingConfig = nested(ContinuousSamplingConfig)
    grid_samples: int = bounded(8, min=1)  # periodic grid: real images' codes -> stage-2 samples


# ----- sizes: MAR's released models and CPU-sized ones for the tests and the tiny recipe -----------------

_TINY = dict(latent_channels=4, latent_size=8, buffer_size=4, encoder_dim=64, encoder_depth=2, encoder_heads=4,
             decoder_dim=64, decoder_depth=2, decoder_heads=4, attn_dropout=0.0, proj_dropout=0.0,
             diffloss_depth=2, diffloss_width=128, code_vocab=512, code_size=8,
             qformer_queries=8, qformer_depth=1)
PRESETS = {
    "mar-b": MARConfig(),  # MAR mar_base: mar_base.pth
    "mar-l": MARConfig(encoder_dim=1024, encoder_depth=16, encoder_heads=16, decoder_dim=1024, decoder_depth=16,
                       decoder_heads=16, diffloss_depth=8, diffloss_width=1280),  # mar_large.pth
    "mar-h": MARConfig(encoder_dim=1280, encoder_depth=20, encoder_heads=16, decoder_dim=1280, decoder_depth=20,
                       decoder_heads=16, diffloss_depth=12, diffloss_width=1536),  # mar_huge.pth
    # CPU-sized, for the tiny tokenizers at 32 px (kl-tiny-s4: 4 x 8 x 8 latents; vq-tiny-s4: 8 x 8 of 512 codes)
    "mar-tiny": MARConfig(**_TINY),
    "mar-tiny-s8": MARConfig(**{**_TINY, "latent_size": 4, "code_size": 4}),  # kl-tiny-s8 / vq-tiny-s8
}

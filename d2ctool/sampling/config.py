"""Recipe section `sample`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from d2ctool.config import bounded, nested
from d2ctool.continuous.config import ContinuousSamplingConfig
from d2ctool.discrete.config import SamplingConfig

@dataclass(frozen=True)
class Mode:
    """What a sampling mode runs and reads: the one table behind `d2c plan`, `build_chain` and the chain."""

    stage1: bool  # codes from the stage-1 model
    stage2: bool  # latents from the stage-2 model
    decoder: Literal["vq", "kl"]  # the tokenizer that turns the output into pixels
    real_images: bool = False  # reads encoded shards of real images (sample.oracle_data)
    fused: bool | None = None  # stage 2 must condition on codes (True) or must not (False); None: no stage 2

    @property
    def stages(self) -> tuple[str, ...]:
        """The training stages (recipe sections) whose models the mode samples from."""
        return ("discrete",) * self.stage1 + ("continuous",) * self.stage2

    @property
    def uses_vq(self) -> bool:  # stage 1's codes must be the VQ tokenizer's
        return self.stage1 or self.decoder == "vq"

    @property
    def uses_kl(self) -> bool:  # stage 2's latents are the KL tokenizer's
        return self.stage2 or self.decoder == "kl"


MODES = {
    "two-stage": Mode(stage1=True, stage2=True, decoder="kl", fused=True),
    "discrete-only": Mode(stage1=True, stage2=False, decoder="vq"),  # the LlamaGen baseline
    "continuous-only": Mode(stage1=False, stage2=True, decoder="kl", fused=False),  # the MAR baseline
    "oracle-codes": Mode(stage1=False, stage2=True, decoder="kl", real_images=True, fused=True),  # stage 2's ceiling
    "vq-reconstruction": Mode(stage1=False, stage2=False, decoder="vq", real_images=True),  # the tokenizers' ceilings
    "kl-reconstruction": Mode(stage1=False, stage2=False, decoder="kl", real_images=True),
}


# the image size of the released class-conditional stage-1 files (LlamaGen c2i_*_256.pt, RAR rar_*.bin)
OFFICIAL_IMAGE_SIZE = 256


@dataclass
class SampleConfig:
    mode: Literal[tuple(MODES)] = "two-stage"
    discrete: str | None = None  # stage 1: a train-discrete run folder, or LlamaGen's c2i_*_256.pt
    discrete_preset: str = "gpt-b"  # architecture of an official stage-1 file
    continuous: str | None = None  # stage 2: a train-continuous run folder, our checkpoint, or MAR's mar_*.pth
    continuous_preset: str = "mar-b"  # architecture of an official stage-2 file
    oracle_data: str | None = None  # oracle-codes and *-reconstruction: encoded shards of real images
    # pixels per side of the token grid (stage 1's grid x the VQ stride). None: our own stage-1 run's, and 256 for an
    # official stage-1 file (whose grid it sets: LlamaGen's 384 px models need 384); a run that does not make
    # images of this size is refused
    image_size: int | None = bounded(None, min=8)
    num_images: int = bounded(50_000, min=1)
    classes: list[int] | None = None  # explicit labels, cycled; default: class-balanced over all classes
    batch_size: int = bounded(64, min=1)  # fixed per run: a batch's seed comes from its first image's index
    seed: int = 0
    use_ema: bool = True
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast on GPU; the CPU always runs fp32
    device: str | None = None
    grid_classes: int = bounded(8, min=1)  # grid.png: this many classes (rows) ...
    grid_per_class: int = bounded(8, min=1)  # ... by this many samples
    stage1: SamplingConfig = nested(SamplingConfig)
    stage2: ContinuousSamplingConfig = nested(ContinuousSamplingConfig)


@dataclass
class SweepConfig:
    """Recipe section `sweep`: the grid of sampling settings `d2c sweep` measures (see d2ctool/sweep.py)."""

    # axes, each "KEY=V1,V2,..." with KEY a `sample` setting (e.g. stage2.num_iter=1,2,4), or tied keys
    # "K1:K2=A1:A2,B1:B2" (e.g. stage2.sampler:stage2.num_sampling_steps=ddpm:25,dpm-solver++:10); the
    # points are the product of the axes. An axis of a stage a system does not use is left out for it.
    grid: list[str] = field(default_factory=list)
    warmup_batches: int = bounded(1, min=0)  # timing: batches run first and not counted
    timing_batches: int = bounded(2, min=1)  # timing: batches counted

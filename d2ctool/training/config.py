"""Training-run settings shared by every training command (the `train` sub-section of a stage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from d2ctool.config import bounded
from d2ctool.errors import UserError


@dataclass
class TrainConfig:
    steps: int = bounded(100_000, min=1)  # optimizer steps
    global_batch_size: int = bounded(256, min=1)  # over all ranks and accumulation steps
    grad_accum: int = bounded(1, min=1)
    base_lr: float = bounded(1e-4, min=0.0)  # lr = base_lr * global_batch_size / 256
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = bounded(0, min=0)  # linear warmup from 0
    min_lr_ratio: float = bounded(0.0, min=0.0, max=1.0)  # cosine ends at base lr * this
    weight_decay: float = bounded(0.05, min=0.0)  # weight matrices and embeddings only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = bounded(1.0, min=0.0)  # 0 = off
    ema_decay: float = bounded(0.9999, min=0.0, max=1.0)  # 0 = no EMA
    sample_with_ema: bool = True  # grids and exports use the EMA weights
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast on GPU; the CPU always runs fp32
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False
    seed: int = 0
    log_every: int = bounded(50, min=1)
    ckpt_every: int = bounded(5000, min=1)  # also writes checkpoints/last.pt; the final step is always saved
    keep_last: int = bounded(0, min=0)  # keep the K newest step_N.pt (0 = keep every one) ...
    keep_every: int = bounded(0, min=0)  # ... and every step_N.pt whose N divides by this (0 = none)
    sample_every: int = bounded(5000, min=0)  # sample grid PNG; 0 = only at the end
    num_workers: int = bounded(4, min=0)  # DataLoader worker processes per rank
    shuffle_buffer: int = bounded(1000, min=0)
    device: str | None = None  # default: the local GPU under torchrun, else cuda if present, else cpu
    wandb: str | None = None  # a Weights & Biases project to log to as well (pip install "d2ctool[wandb]")


def micro_batch(train: TrainConfig, ranks: int, samples_per_rank: int | None = None, *, section: str = "",
                ranks_name: str = "ranks", who: str = "") -> int:
    """The per-rank micro-batch of `train` over `ranks`. Fails when the global batch does not divide over
    ranks × grad_accum, or when `samples_per_rank` (the reader drops the last partial batch) makes no full
    step. The trainer and `d2c plan` both check here; `section` names the recipe section in messages."""
    key = f"{section}.train" if section else "train"
    ranks_accum = ranks * train.grad_accum
    if train.global_batch_size % ranks_accum:
        raise UserError(f"{key}.global_batch_size {train.global_batch_size} does not divide over {ranks_name} × "
                        f"{key}.grad_accum = {ranks} × {train.grad_accum}; choose a multiple of {ranks_accum}")
    per_rank = train.global_batch_size // ranks_accum
    if samples_per_rank is not None and samples_per_rank // per_rank < train.grad_accum:
        raise UserError(f"{who or section}: {samples_per_rank} samples per rank make no full step of {per_rank} × "
                        f"{train.grad_accum}; lower {key}.global_batch_size")
    return per_rank


@dataclass
class PlanConfig:
    """Recipe section `plan`: what `d2c plan` assumes about the data and the cluster (no data is read)."""

    train_images: int = bounded(1_281_167, min=1)  # ImageNet-1k train
    num_classes: int = bounded(1000, min=1)
    gpus: int = bounded(8, min=1)  # ranks of the run: nodes x GPUs per node
    gpu: Literal["a100", "h100", "h200"] = "h100"  # SXM parts, dense bf16 peak: 312 / 989 / 989 TFLOP/s
    mfu: float = bounded(0.35, min=0.01, max=1.0)  # model FLOPs utilisation assumed for the wall time

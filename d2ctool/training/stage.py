"""What the two stage training tasks (train-discrete, train-continuous) share: both learn from encoded
shards, read them the same way, and export nothing beyond their checkpoints and grids."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from d2ctool.data import encoded
from d2ctool.data.reader import ShardReader
from d2ctool.errors import UserError


class EncodedShardsTask:
    """A `TrainingTask` over the encoded shards in `cfg.data` (a stage's recipe section, named `section`)."""

    name: str

    def __init__(self, cfg, section: str):
        if not cfg.data:
            raise UserError(f"{section}.data is not set: give the encoded shards (`d2c encode` output)")
        self.cfg = cfg
        self.manifest = encoded.read_manifest(cfg.data)

    def reader(self, epoch: int, rank: int, world: int, seed: int, shuffle_buffer: int) -> ShardReader:
        return ShardReader(self.cfg.data, rank, world, shuffle=True, seed=seed, epoch=epoch,
                           shuffle_buffer=shuffle_buffer, manifest_kind=encoded.FORMAT)

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict:
        return {"grid": str(run_dir / "grids")}

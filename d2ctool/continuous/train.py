"""`d2c train-continuous`: the stage-2 masked AR model on encoded shards, with the shared trainer.

Each step sees a fresh latent drawn from the stored posterior moments (normalised by the encode
manifest's `latent_norm`: a scale factor or per-channel statistics), of the original or the h-flipped
image, and the discrete codes of the same flip (teacher forcing: stage 2 learns on real images' codes). The periodic grid shows, for a few real
images, the KL decoding of their posterior mean above stage-2 samples conditioned on their codes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from d2ctool.continuous.config import ContinuousConfig
from d2ctool.continuous.load import init_from_checkpoint, preset_config
from d2ctool.continuous.model import MAR
from d2ctool.continuous.sample import sample_latents
from d2ctool.data.reader import ShardReader
from d2ctool.data.shards import load_manifest, read_npy
from d2ctool.errors import UserError
from d2ctool.progress import info
from d2ctool.tokenizers.kl import posterior_latents
from d2ctool.tokenizers.latent_norm import from_manifest
from d2ctool.tokenizers.load import load_tokenizer
from d2ctool.training.trainer import Trainer, TrainResult
from d2ctool.visual import save_grid, to_uint8

ENCODED = "d2c-encoded-shards"


def model_config_for_data(cfg: ContinuousConfig, manifest: dict):
    """The preset with the data's latent shape, code vocabulary/grid and classes, and the recipe's fusion."""
    grid = manifest["grid"][0]
    overrides = {"latent_channels": manifest["tokenizers"]["kl"]["latent_channels"], "latent_size": grid,
                 "code_vocab": manifest["tokenizers"]["vq"]["codebook_size"], "code_size": grid,
                 "num_classes": len(manifest["classes"]), "fusion": cfg.fusion,
                 "code_corrupt_prob": cfg.code_corrupt_prob,
                 "grad_checkpointing": cfg.train.grad_checkpointing}
    for name in ("qformer_queries", "qformer_depth", "label_drop_prob", "diffusion_batch_mul"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    return preset_config(cfg.model, overrides)


class ContinuousTask:
    name = "train-continuous"

    def __init__(self, cfg: ContinuousConfig):
        if not cfg.data:
            raise UserError("continuous.data is not set: give the encoded shards (`d2c encode` output)")
        self.cfg = cfg
        self.manifest = load_manifest(cfg.data, ENCODED)
        self.norm = from_manifest(self.manifest)
        self._model_cfg = model_config_for_data(cfg, self.manifest)
        self.model_config = dataclasses.asdict(self._model_cfg)
        self._kl_record = self.manifest["tokenizers"]["kl"]
        if not Path(self._kl_record["checkpoint"]).is_file():
            raise UserError(f"the KL tokenizer the data was encoded with is missing: {self._kl_record['checkpoint']} "
                            "(restore it: it decodes the periodic sample grids)")
        self._kl = None
        self._grid_batch = None

    def build_model(self) -> MAR:
        model = MAR(self._model_cfg)
        if self.cfg.init:
            new = init_from_checkpoint(model, self.cfg.init)
            info(f"train-continuous: initialised from {self.cfg.init}; {len(new)} new parameter tensor(s)"
                 + (f": {', '.join(new[:6])}{' ...' if len(new) > 6 else ''}" if new else ""))
        return model

    def reader(self, epoch: int, rank: int, world: int, seed: int, shuffle_buffer: int) -> ShardReader:
        return ShardReader(self.cfg.data, rank, world, shuffle=True, seed=seed, epoch=epoch,
                           shuffle_buffer=shuffle_buffer, manifest_kind=ENCODED)

    def decode(self, members: dict, rng: np.random.Generator):
        flip = int(rng.integers(2))  # codes and moments of the same (original or flipped) image
        moments = torch.from_numpy(read_npy(members["moments.npy"])[flip].astype(np.float32))
        noise = torch.from_numpy(rng.standard_normal((moments.shape[0] // 2, *moments.shape[1:])).astype(np.float32))
        latents = self.norm.apply(posterior_latents(moments[None], noise[None]))[0]
        codes = torch.from_numpy(read_npy(members["codes.npy"])[flip].astype(np.int64))
        return latents, int(members["cls"]), codes

    def loss(self, model, batch, device):
        latents, labels, codes = (t.to(device, non_blocking=True) for t in batch)
        return model(latents, labels, codes if self._model_cfg.fusion != "none" else None), {}

    def after_step(self, model, step: int) -> None:
        pass

    def kl(self, device: torch.device):
        if self._kl is None:
            self._kl, _ = load_tokenizer("kl", self._kl_record["name"], self._kl_record["checkpoint"])
        return self._kl.to(device)

    def grid_batch(self):
        """The first `grid_samples` images of the data: posterior means, labels and codes (original view)."""
        if self._grid_batch is None:
            means, labels, codes = [], [], []
            for _, members in ShardReader(self.cfg.data, 0, 1, manifest_kind=ENCODED).raw():
                moments = torch.from_numpy(read_npy(members["moments.npy"])[0].astype(np.float32))
                means.append(self.norm.apply(posterior_latents(moments[None], None))[0])
                labels.append(int(members["cls"]))
                codes.append(torch.from_numpy(read_npy(members["codes.npy"])[0].astype(np.int64)))
                if len(means) == self.cfg.grid_samples:
                    break
            self._grid_batch = torch.stack(means), torch.tensor(labels), torch.stack(codes)
        return self._grid_batch

    @torch.no_grad()
    def write_grid(self, model: MAR, path: Path, device: torch.device) -> None:
        means, labels, codes = (t.to(device) for t in self.grid_batch())
        latents = sample_latents(model, labels, codes if self._model_cfg.fusion != "none" else None,
                                 self.cfg.sampling, generator=torch.Generator(device).manual_seed(0))
        kl = self.kl(device)
        images = torch.cat([kl.decode_latents(means, self.norm), kl.decode_latents(latents, self.norm)])
        save_grid(path, to_uint8(images), len(means), ["real", "stage 2"])

    def finish(self, model: MAR, run_dir: Path, device: torch.device) -> dict:
        return {"grid": str(run_dir / "grids")}


def train_continuous(cfg: ContinuousConfig, resolved_config: dict, resolved_yaml: str) -> TrainResult:
    if not cfg.out:
        raise UserError("continuous.out is not set: give the run folder")
    task = ContinuousTask(cfg)
    resolved_config = {**resolved_config, "trained_on": trained_on(task.manifest)}
    return Trainer(task, cfg.train, cfg.out, resolved_config, resolved_yaml).run()


def trained_on(manifest: dict) -> dict:
    """What stage 2 learns from, saved in its checkpoints: sampling checks its tokenizers against it."""
    vq, kl = manifest["tokenizers"]["vq"], manifest["tokenizers"]["kl"]
    return {"latent_norm": from_manifest(manifest).record(), "grid": manifest["grid"],
            "vq": {k: vq.get(k) for k in ("name", "checkpoint", "sha256", "codebook_size")},
            "kl": {k: kl.get(k) for k in ("name", "checkpoint", "sha256", "latent_channels")}}

"""`d2c train-continuous`: the stage-2 masked AR model on encoded shards, with the shared trainer.

Each step sees a fresh latent drawn from the stored posterior moments (normalised by the encode
manifest's `latent_norm`: a scale factor or per-channel statistics) of one stored view of the image
(the original or its h-flip, or one of ten crops), drawn at random, and the discrete codes of the same
view (teacher forcing: stage 2 learns on real images' codes). The periodic grid shows, for a few real
images, the KL decoding of their posterior mean above stage-2 samples conditioned on their codes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from d2ctool.continuous.config import ContinuousConfig
from d2ctool.continuous.load import init_from_checkpoint, preset_config
from d2ctool.continuous.model import MAR
from d2ctool.continuous.sample import sample_latents
from d2ctool.data.encoded import EncodedManifest, first_samples, sample_codes, sample_moments
from d2ctool.errors import UserError
from d2ctool.identity import shard_input
from d2ctool.progress import info
from d2ctool.tokenizers.kl import posterior_latents
from d2ctool.tokenizers.latent_norm import from_manifest
from d2ctool.tokenizers.load import load_tokenizer
from d2ctool.training.stage import EncodedShardsTask
from d2ctool.training.trainer import Trainer, TrainResult
from d2ctool.visual import save_grid, to_uint8

def model_config_for_data(cfg: ContinuousConfig, manifest: EncodedManifest):
    """The preset with the data's latent shape, code vocabulary/grid and classes, and the recipe's fusion."""
    grid = manifest.grid
    overrides = {"latent_channels": manifest.latent_channels, "latent_size": grid,
                 "code_vocab": manifest.codebook_size, "code_size": grid,
                 "num_classes": manifest.num_classes, "fusion": cfg.fusion,
                 "code_corrupt_prob": cfg.code_corrupt_prob,
                 "grad_checkpointing": cfg.train.grad_checkpointing}
    for name in ("qformer_queries", "qformer_depth", "label_drop_prob", "diffusion_batch_mul"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    return preset_config(cfg.model, overrides)


class ContinuousTask(EncodedShardsTask):
    name = "train-continuous"

    def __init__(self, cfg: ContinuousConfig):
        super().__init__(cfg, "continuous")
        self.norm = from_manifest(self.manifest.data, f"{Path(cfg.data) / 'manifest.json'}")
        self._model_cfg = model_config_for_data(cfg, self.manifest)
        self.tokens_per_sample = self._model_cfg.seq_len
        self.model_config = dataclasses.asdict(self._model_cfg)
        self._kl_record = self.manifest.kl
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

    def decode(self, members: dict, rng: np.random.Generator):
        view = int(rng.integers(self.manifest.num_views))  # codes and moments of the same view, drawn at random
        moments = torch.from_numpy(sample_moments(members, view))
        noise = torch.from_numpy(rng.standard_normal((moments.shape[0] // 2, *moments.shape[1:])).astype(np.float32))
        latents = self.norm.apply(posterior_latents(moments[None], noise[None]))[0]
        codes = torch.from_numpy(sample_codes(members, view))
        return latents, int(members["cls"]), codes

    def loss(self, model, batch, device):
        latents, labels, codes = (t.to(device, non_blocking=True) for t in batch)
        loss = model(latents, labels, codes if self._model_cfg.fusion != "none" else None)
        head = _unwrapped(model).diffloss
        return loss, loss_by_noise_level(*head.last_terms, head.train_schedule.num_steps)

    def kl(self, device: torch.device):
        if self._kl is None:
            self._kl, _ = load_tokenizer("kl", self._kl_record["name"], self._kl_record["checkpoint"])
        return self._kl.to(device)

    def grid_batch(self):
        """The first `grid_samples` images of the data: posterior means, labels and codes (original view)."""
        if self._grid_batch is None:
            codes, labels, moments = first_samples(self.cfg.data, self.cfg.grid_samples)
            means = self.norm.apply(posterior_latents(torch.from_numpy(moments), None))
            self._grid_batch = means, torch.from_numpy(labels), torch.from_numpy(codes)
        return self._grid_batch

    @torch.no_grad()
    def write_grid(self, model: MAR, path: Path, device: torch.device) -> None:
        means, labels, codes = (t.to(device) for t in self.grid_batch())
        latents = sample_latents(model, labels, codes if self._model_cfg.fusion != "none" else None,
                                 self.cfg.sampling, generator=torch.Generator(device).manual_seed(0))
        kl = self.kl(device)
        images = torch.cat([kl.decode_latents(means, self.norm), kl.decode_latents(latents, self.norm)])
        save_grid(path, to_uint8(images), len(means), ["real", "stage 2"])


NOISE_BUCKETS = 4


def _unwrapped(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def loss_by_noise_level(t: torch.Tensor, loss: torch.Tensor, mask: torch.Tensor | None, num_steps: int) -> dict:
    """The head's mean loss over the masked tokens in NOISE_BUCKETS equal ranges of the diffusion step t
    (`loss_t0-249` is the least noisy quarter): which noise levels the head has not learned yet."""
    weight = torch.ones_like(loss) if mask is None else mask.to(loss.dtype)
    bucket = (t * NOISE_BUCKETS // num_steps).clamp(max=NOISE_BUCKETS - 1)
    sums = torch.zeros(NOISE_BUCKETS, device=loss.device).index_add_(0, bucket, loss.float() * weight)
    counts = torch.zeros(NOISE_BUCKETS, device=loss.device).index_add_(0, bucket, weight.float())
    width = num_steps // NOISE_BUCKETS
    return {f"loss_t{i * width}-{(i + 1) * width - 1}": float(sums[i] / counts[i])
            for i in range(NOISE_BUCKETS) if counts[i] > 0}


def train_continuous(cfg: ContinuousConfig, resolved_config: dict, resolved_yaml: str,
                     steps_given: bool = True) -> TrainResult:
    if not cfg.out:
        raise UserError("continuous.out is not set: give the run folder")
    task = ContinuousTask(cfg)
    resolved_config = {**resolved_config, "trained_on": trained_on(task.manifest)}
    return Trainer(task, cfg.train, cfg.out, resolved_config, resolved_yaml, {"data": shard_input(cfg.data)},
                   steps_given).run()


def trained_on(manifest: EncodedManifest) -> dict:
    """What stage 2 learns from, saved in its checkpoints: sampling checks its tokenizers against it."""
    vq, kl = manifest.vq, manifest.kl
    return {"latent_norm": from_manifest(manifest.data).record(), "grid": [manifest.grid, manifest.grid],
            "vq": {k: vq.get(k) for k in ("name", "checkpoint", "sha256", "codebook_size")},
            "kl": {k: kl.get(k) for k in ("name", "checkpoint", "sha256", "latent_channels")}}

"""`d2c train-tokenizer vq|kl SHARDS OUT`: a small tokenizer on image shards, with the shared trainer.

The run folder gets, besides the trainer's checkpoints and grids, `tokenizer.pt` (our own format:
the architecture travels with the weights, so `tokenizers.vq/kl.checkpoint` can point at it),
`report.json` (held-out reconstruction PSNR beside a blur baseline, codebook usage) and
`reconstructions.png` (originals above reconstructions).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2ctool.data.reader import ShardReader, decode_image, image_member
from d2ctool.data.shards import load_manifest
from d2ctool.data.transforms import adm_center_crop, to_minus_one_one
from d2ctool.errors import UserError
from d2ctool.identity import shard_input
from d2ctool.io import write_json
from d2ctool.tokenizers.config import TokenizerTrainingConfig
from d2ctool.tokenizers.kl import posterior_kl
from d2ctool.tokenizers.load import build_tokenizer, preset_config, save_tokenizer
from d2ctool.training.trainer import Trainer, TrainResult
from d2ctool.visual import save_grid, to_uint8


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def blur_baseline(images: torch.Tensor, stride: int) -> torch.Tensor:
    """What one colour per token cell gives: box-downsample by the stride, bilinear upsample."""
    small = F.avg_pool2d(images, stride)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


class TokenizerTask:
    name = "train-tokenizer"

    def __init__(self, kind: str, data: str | Path, cfg: TokenizerTrainingConfig):
        self.kind, self.data, self.cfg = kind, Path(data), cfg
        if kind == "vq":
            model_cfg = preset_config("vq", cfg.vq_preset)
            if cfg.codebook_size:
                model_cfg.codebook_size = cfg.codebook_size
            self.preset = cfg.vq_preset
        else:
            model_cfg = preset_config("kl", cfg.kl_preset)
            if cfg.latent_channels:
                model_cfg.embed_dim = cfg.latent_channels
            if cfg.scale_factor:
                model_cfg.scale_factor = cfg.scale_factor
            self.preset = cfg.kl_preset
        if cfg.resolution % model_cfg.stride:
            raise UserError(f"tokenizer_training.resolution {cfg.resolution} is not a multiple of the stride "
                            f"{model_cfg.stride} of {self.preset}")
        self.model_cfg = model_cfg
        self.model_config = dataclasses.asdict(model_cfg)
        ShardReader(self.data)  # fails early on a missing or unfinished shard folder
        self._val: torch.Tensor | None = None
        self._last_used: torch.Tensor | None = None  # step at which each code was last chosen
        self._latents: torch.Tensor | None = None  # recent encoder outputs, to restart dead codes from

    def build_model(self):
        model = build_tokenizer(self.kind, self.model_cfg)
        if self.kind == "vq":
            self._last_used = torch.zeros(self.model_cfg.codebook_size, dtype=torch.long)
            self._used_now = torch.zeros(self.model_cfg.codebook_size, dtype=torch.bool)
        return model

    def reader(self, epoch: int, rank: int, world: int, seed: int, shuffle_buffer: int) -> ShardReader:
        return ShardReader(self.data, rank, world, shuffle=True, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer)

    def decode(self, members: dict, rng: np.random.Generator) -> torch.Tensor:
        image = adm_center_crop(decode_image(image_member(members)), self.cfg.resolution)
        array = to_minus_one_one(image)
        if rng.random() < 0.5:
            array = array[:, :, ::-1]
        return torch.from_numpy(array.copy())

    def loss(self, model, batch: torch.Tensor, device: torch.device):
        x = batch.to(device, non_blocking=True)
        cfg = self.cfg
        if self.kind == "vq":
            recon, indices, aux = model(x)
            self._note_usage(indices, aux["latents"])
            extra = aux["codebook"] + aux["commit"]
            parts = {"codebook": aux["codebook"].item(), "commit": aux["commit"].item()}
        else:
            recon, moments = model(x)
            kl = posterior_kl(moments)
            extra = cfg.kl_weight * kl
            parts = {"kl": kl.item()}
        l1, l2 = (recon - x).abs().mean(), ((recon - x) ** 2).mean()
        return cfg.l1_weight * l1 + cfg.l2_weight * l2 + extra, {"l1": l1.item(), "l2": l2.item(), **parts}

    # ---- VQ codebook upkeep --------------------------------------------------------------------
    def _note_usage(self, indices: torch.Tensor, latents: torch.Tensor) -> None:
        self._used_now[indices.flatten().cpu()] = True  # OR over the accumulation micro-batches
        self._latents = latents[torch.randperm(len(latents), device=latents.device)[:4096]]

    @torch.no_grad()
    def after_step(self, model, step: int) -> None:
        """Move codes unused for `dead_code_steps` steps onto random recent encoder outputs.

        Ranks agree: usage is OR-ed over ranks and the replacement vectors come from rank 0.
        """
        if self.kind != "vq":
            return
        used, self._used_now = self._used_now, torch.zeros_like(self._used_now)
        if torch.distributed.is_initialized():
            flags = used.to(self._latents.device, torch.uint8)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            used = flags.bool().cpu()
        self._last_used[used] = step
        dead = (step - self._last_used) >= self.cfg.dead_code_steps
        count = int(dead.sum())
        if count == 0:
            return
        choice = torch.randint(len(self._latents), (count,), device=self._latents.device)
        replacement = self._latents[choice].float().contiguous()
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(replacement, src=0)
        weight = model.quantize.embedding.weight
        weight[dead.to(weight.device)] = replacement.to(weight.dtype)
        self._last_used[dead] = step

    # ---- evaluation ----------------------------------------------------------------------------
    def val_images(self) -> torch.Tensor:
        if self._val is None:
            source = self.cfg.val or self.data
            reader = ShardReader(source, 0, 1)
            images = []
            for _, members in reader.raw():
                image = adm_center_crop(decode_image(image_member(members)), self.cfg.resolution)
                images.append(torch.from_numpy(to_minus_one_one(image)))
                if len(images) == self.cfg.val_images:
                    break
            self._val = torch.stack(images)
        return self._val

    @torch.no_grad()
    def reconstruct(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "vq":
            codes = model.encode(images)
            return model.decode_codes(codes), codes
        return model.decode_latents(model.latents_from_moments(model.encode_moments(images), sample=False)), None

    @torch.no_grad()
    def write_grid(self, model, path: Path, device: torch.device) -> None:
        images = self.val_images()[:8].to(device)
        recon, _ = self.reconstruct(model, images)
        save_grid(path, to_uint8(torch.cat([images, recon])), len(images), ["input", "recon"])

    @torch.no_grad()
    def fit_scale_factor(self, model, images: torch.Tensor, device: torch.device) -> float:
        """LDM's rule: 1 / std of posterior samples, so stage 2 models latents of about unit variance."""
        samples = [model.latents_from_moments(model.encode_moments(b.to(device)), sample=True) / model.cfg.scale_factor
                   for b in images.split(64)]
        return round(1.0 / float(torch.cat(samples).std()), 4)

    @torch.no_grad()
    def finish(self, model, run_dir: Path, device: torch.device) -> dict:
        images = self.val_images()
        if self.kind == "kl" and self.cfg.scale_factor is None:
            model.cfg.scale_factor = self.model_cfg.scale_factor = self.fit_scale_factor(model, images, device)
        scores, baseline, codes = [], [], []
        for batch in images.split(64):
            batch = batch.to(device)
            recon, batch_codes = self.reconstruct(model, batch)
            scores.append(psnr(recon, batch).cpu())
            baseline.append(psnr(blur_baseline(batch, model.stride), batch).cpu())
            if batch_codes is not None:
                codes.append(batch_codes.flatten().cpu())
        report = {
            "kind": self.kind, "preset": self.preset, "resolution": self.cfg.resolution,
            "val": str(self.cfg.val or self.data) + ("" if self.cfg.val else " (training images: no held-out set given)"),
            "val_images": len(images),
            "psnr_db": round(float(torch.cat(scores).mean()), 3),
            "blur_baseline_psnr_db": round(float(torch.cat(baseline).mean()), 3),
        }
        if self.kind == "kl":
            report["scale_factor"] = model.cfg.scale_factor
        if codes:
            used = torch.cat(codes).unique().numel()
            report.update(codes_used=used, codebook_size=self.model_cfg.codebook_size,
                          codebook_usage=round(used / self.model_cfg.codebook_size, 4))
        save_tokenizer(run_dir / "tokenizer.pt", model.cpu(), self.kind, name=f"{self.preset}-trained",
                       extra={"report": report})
        model.to(device)
        write_json(run_dir / "report.json", report)
        self.write_grid(model, run_dir / "reconstructions.png", device)
        summary = {"psnr": f"{report['psnr_db']} dB (blur baseline {report['blur_baseline_psnr_db']} dB)"}
        if codes:
            summary["codebook usage"] = f"{report['codebook_usage']:.0%}"
        summary["tokenizer"] = str(run_dir / "tokenizer.pt")
        return summary


def train_tokenizer(kind: str, data: str | Path, out: str | Path, cfg: TokenizerTrainingConfig,
                    resolved_config: dict, resolved_yaml: str, steps_given: bool = True) -> TrainResult:
    if kind not in ("vq", "kl"):
        raise UserError(f"train-tokenizer: KIND must be vq or kl, got {kind!r}")
    for what, folder in (("SHARDS", data), ("tokenizer_training.val", cfg.val)):
        if folder is not None:  # both checked now: val is read only after the last step
            try:
                load_manifest(folder)
            except UserError as e:
                raise UserError(f"{what}: {e}") from None
    task = TokenizerTask(kind, data, cfg)
    task.name = f"train-tokenizer-{kind}"
    inputs = {"data": shard_input(data), **({"val": shard_input(cfg.val)} if cfg.val is not None else {})}
    return Trainer(task, cfg.train, out, {"kind": kind, "data": str(data), **resolved_config}, resolved_yaml,
                   inputs, steps_given).run()

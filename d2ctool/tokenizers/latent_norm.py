"""Latent normalisation: the map between a KL tokenizer's latents z and what stage 2 models.

    scale     z' = z * s                    (MAR: s = 0.2325 for kl16; LDM's 1 / std rule)
    channel   z' = (z - mean_c) / std_c     (LightningDiT: `latents_stats.pt`, {'mean', 'std'} [1, C, 1, 1])

`LatentNorm.apply` and `LatentNorm.invert` are the only places either rule is evaluated: stage-2
training data, its grids and sampling all go through them. `d2c encode` decides the rule, records it
in its manifest (`latent_norm`), and for `channel` reads a stats file or computes the statistics the
way LightningDiT does (`channel_stats`): per channel over (N, H, W), unbiased std, on posterior samples
of up to 10,000 randomly chosen images (the originals, not the flips).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import torch

from d2ctool.checkpoints import load_file
from d2ctool.checks import require_finite
from d2ctool.errors import UserError
from d2ctool.io import atomic_path, sha256_file

STATS_IMAGES = 10_000  # LightningDiT's ImgLatentDataset.compute_latent_stats


@dataclass(frozen=True)
class LatentNorm:
    kind: Literal["scale", "channel"]
    scale: float = 1.0  # kind scale
    mean: tuple[float, ...] = ()  # kind channel: one value per latent channel
    std: tuple[float, ...] = ()
    source: str = ""  # where the numbers come from, for manifests and error messages

    @classmethod
    def scalar(cls, scale: float, source: str = "") -> LatentNorm:
        if not math.isfinite(float(scale)) or float(scale) == 0:
            raise UserError(f"latent scale factor ({source}): must be a finite non-zero number, got {scale}")
        return cls("scale", scale=float(scale), source=source)

    @classmethod
    def per_channel(cls, mean, std, source: str = "") -> LatentNorm:
        try:
            mean, std = (tuple(float(v) for v in torch.as_tensor(t, dtype=torch.float64).reshape(-1).tolist())
                         for t in (mean, std))
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"latent statistics ({source}): mean and std must be lists of numbers") from None
        if len(mean) != len(std) or not mean:
            raise UserError(f"latent statistics ({source}): mean has {len(mean)} values, std {len(std)}")
        require_finite(torch.tensor(mean + std, dtype=torch.float64), f"latent statistics ({source}): mean and std",
                       "recompute them from latents of a tokenizer with finite weights")
        if min(std) <= 0:
            raise UserError(f"latent statistics ({source}): std must be positive, got min {min(std)}")
        return cls("channel", mean=mean, std=std, source=source)

    @property
    def channels(self) -> int | None:
        return len(self.mean) if self.kind == "channel" else None

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[1] != len(self.mean):
            raise UserError(f"per-channel latent statistics ({self.source}) have {len(self.mean)} channels, "
                            f"the latents {z.shape[1]}")
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, dtype=z.dtype, device=z.device).view(shape),
                torch.tensor(self.std, dtype=z.dtype, device=z.device).view(shape))

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents [B, C, h, w] -> what stage 2 models."""
        if self.kind == "scale":
            return z * self.scale
        mean, std = self._stats(z)
        return (z - mean) / std

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """What stage 2 makes -> tokenizer latents, ready to decode."""
        if self.kind == "scale":
            return z / self.scale
        mean, std = self._stats(z)
        return z * std + mean

    def record(self) -> dict:
        out = {"kind": self.kind, "source": self.source}
        if self.kind == "scale":
            out["scale"] = self.scale
        else:
            out.update(mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_record(cls, record: dict, where: str = "latent_norm") -> LatentNorm:
        """The rule a manifest or checkpoint recorded (`record()`), every field checked; `where` names the file."""
        kind = record.get("kind") if isinstance(record, dict) else None
        needs = {"scale": ("scale",), "channel": ("mean", "std")}.get(kind)
        if needs is None or any(k not in record for k in needs):
            raise UserError(f"{where}: not a latent normalisation record (expected kind 'scale' with scale, or "
                            f"'channel' with mean and std; got {str(record)[:80]}); re-run `d2c encode` to rewrite it")
        source = str(record.get("source", ""))
        if kind == "scale" and (isinstance(record["scale"], bool) or not isinstance(record["scale"], (int, float))):
            raise UserError(f"{where}: the latent scale must be a number, got {record['scale']!r}")
        try:
            if kind == "scale":
                return cls.scalar(record["scale"], source)
            return cls.per_channel(record["mean"], record["std"], source)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

    def describe(self) -> str:
        if self.kind == "scale":
            return f"scale factor {self.scale:g}"
        return f"per-channel mean/std of {len(self.mean)} channels ({self.source})"


def from_manifest(manifest: dict, where: str = "the encoded shards' manifest") -> LatentNorm:
    """The normalisation an encoded-shard folder was written for (older folders: a scale factor only)."""
    if "latent_norm" in manifest:
        return LatentNorm.from_record(manifest["latent_norm"], f"{where}: latent_norm")
    return LatentNorm.from_record({"kind": "scale", "scale": manifest.get("scale_factor"),
                                   "source": "encode manifest scale_factor"}, f"{where}: scale_factor")


def load_stats(path: str | Path, channels: int) -> LatentNorm:
    """LightningDiT's `latents_stats.pt`: {'mean': [1, C, 1, 1], 'std': [1, C, 1, 1]} (any shape of C values)."""
    obj = load_file(path)
    missing = [k for k in ("mean", "std") if not isinstance(obj.get(k), torch.Tensor)]
    if missing:
        raise UserError(f"{path}: a latent statistics file needs tensors 'mean' and 'std' (LightningDiT's "
                        f"latents_stats.pt); missing {', '.join(missing)}")
    for key in ("mean", "std"):
        if obj[key].numel() != channels:
            raise UserError(f"{path}: '{key}' has {obj[key].numel()} values, but the KL tokenizer has {channels} "
                            "latent channels: give the statistics of this tokenizer's latents")
    return LatentNorm.per_channel(obj["mean"], obj["std"], f"{Path(path).resolve()} sha256 {sha256_file(path)}")


def save_stats(path: str | Path, norm: LatentNorm) -> None:
    """Write per-channel statistics in LightningDiT's `latents_stats.pt` layout."""
    c = len(norm.mean)
    with atomic_path(path) as tmp:
        torch.save({"mean": torch.tensor(norm.mean).view(1, c, 1, 1), "std": torch.tensor(norm.std).view(1, c, 1, 1)},
                   tmp)


def channel_stats(latents: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and unbiased std over (N, H, W) of batches [n, C, h, w], accumulated in float64.

    Returns (mean [C], std [C], number of values per channel). Sums are shifted by the first batch's
    channel means, so the variance does not lose precision to a large mean.
    """
    shift = total = total_sq = None
    count = 0
    for z in latents:
        z = z.double().transpose(0, 1).reshape(z.shape[1], -1)  # [C, n*h*w]
        if shift is None:
            shift = z.mean(1, keepdim=True)
            total, total_sq = torch.zeros(len(z), dtype=torch.float64), torch.zeros(len(z), dtype=torch.float64)
        d = z - shift
        total += d.sum(1)
        total_sq += (d * d).sum(1)
        count += z.shape[1]
    if count < 2:
        raise UserError("per-channel latent statistics need at least 2 values per channel")
    mean = total / count
    var = (total_sq - count * mean * mean) / (count - 1)
    return (mean + shift[:, 0]).float(), var.clamp_min(0).sqrt().float(), count

"""The encoded-shard contract: what `d2c encode` writes and what every reader of it may rely on.

An encoded folder is a shard folder (shards.py) of format `FORMAT`. Each sample holds `codes.npy`
(the VQ codes [V, grid*grid] of V views of the image: `VIEWS`), `moments.npy` (the KL posterior's mean
then log-variance on channels, [V, 2C, grid, grid], of the same views) and `cls`. Training draws one view
per sample at random. Its manifest records the views' names, the token grid, both
tokenizers (name, checkpoint, sha256, codebook size or latent channels) and the latent normalisation.
`read_manifest` is the one validating reader of that manifest, `EncodedMembers` the check every reader
applies to each sample (registered with the shard formats); `sample_codes`, `sample_moments` and
`first_samples` are the readers of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2ctool.data.members import npy_member
from d2ctool.data.reader import ShardReader
from d2ctool.data.shards import ShardFormat, load_manifest, read_npy, register_format
from d2ctool.errors import UserError

FORMAT = "d2c-encoded-shards"
MADE_BY = "d2c encode"
# beside `shards`: the manifest keys readers use
REQUIRED = ("classes", "class_counts", "grid", "codes", "moments", "tokenizers", "scale_factor", "resolution")
# the views `d2c encode` stores of each image, by `encode.views`, in their order along dim 0 of codes.npy and
# moments.npy. flip: the ADM centre crop and its h-flip (MAR, and LlamaGen without --ten-crop); ten-crop:
# LlamaGen's --ten-crop, torchvision TenCrop of a larger ADM crop (data/transforms.py `ten_crop`).
_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
VIEWS = {"flip": ("original", "hflip"), "ten-crop": _CORNERS + tuple(f"hflip-{name}" for name in _CORNERS)}
# the view that stands for the image itself (oracle rows, latent statistics): the first of these present
MAIN_VIEWS = ("original", "center")


def main_view(order) -> int:
    """Index of the view that stands for the image itself in a manifest's view `order`."""
    for name in MAIN_VIEWS:
        if name in order:
            return list(order).index(name)
    raise UserError(f"encoded views {list(order)} name none of {', '.join(MAIN_VIEWS)}; "
                    "re-run `d2c encode` into a new folder")


@dataclass
class EncodedManifest:
    """The manifest of an encoded-shard folder, typed. `data` is the whole manifest as written."""

    classes: list[str]
    grid: int  # tokens per side, the same for the codes and the latents
    codebook_size: int
    latent_channels: int
    codes_shape: tuple[int, ...] = ()  # of every sample's codes.npy: [V, grid*grid]
    moments_shape: tuple[int, ...] = ()  # of every sample's moments.npy: [V, 2C, grid, grid]
    views: tuple[str, ...] = VIEWS["flip"]  # the names of the V views, in order
    vq: dict = field(default_factory=dict)  # the VQ tokenizer's record (name, checkpoint, sha256, codebook_size)
    kl: dict = field(default_factory=dict)  # the KL tokenizer's record (name, checkpoint, sha256, latent_channels)
    latent_norm: dict | None = None  # LatentNorm.record(); None in folders that only have `scale_factor`
    scale_factor: float | None = None
    root: Path | None = None
    data: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def main_view(self) -> int:
        return main_view(self.views)

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.data.get("shards", []))

    def tokenizer(self, kind: str) -> dict:
        """The record of tokenizer `kind` ("vq" or "kl") the folder was encoded with."""
        return self.vq if kind == "vq" else self.kl

    @classmethod
    def from_dict(cls, manifest: dict, root: str | Path | None = None) -> "EncodedManifest":
        """Validate a manifest's encoded-shard fields; a UserError names what is missing."""
        try:
            vq, kl = manifest["tokenizers"]["vq"], manifest["tokenizers"]["kl"]
            record = cls(classes=list(manifest["classes"]), grid=int(manifest["grid"][0]),
                         codebook_size=int(vq["codebook_size"]), latent_channels=int(kl["latent_channels"]),
                         codes_shape=tuple(manifest["codes"]["shape"]),
                         moments_shape=tuple(manifest["moments"]["shape"]),
                         views=tuple(manifest["codes"].get("order", VIEWS["flip"])), vq=vq, kl=kl,
                         latent_norm=manifest.get("latent_norm"), scale_factor=manifest.get("scale_factor"),
                         root=None if root is None else Path(root), data=manifest)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{root}/manifest.json: incomplete encoded-shard manifest (no {e}); "
                            f"re-run `{MADE_BY}` into a new folder") from None
        if record.codes_shape[:1] != (record.num_views,) or record.moments_shape[:1] != (record.num_views,):
            raise UserError(f"{root}/manifest.json: {record.num_views} view name(s) but codes of shape "
                            f"{list(record.codes_shape)} and moments of shape {list(record.moments_shape)}; "
                            f"re-run `{MADE_BY}` into a new folder")
        record.main_view  # a UserError if no view stands for the image itself
        return record

    @classmethod
    def planned(cls, grid: int, num_classes: int, codebook_size: int, latent_channels: int,
                views: str = "flip") -> "EncodedManifest":
        """What `d2c encode` would record for data of this shape (`d2c plan`, before any data exists)."""
        names = VIEWS[views]
        return cls([str(i) for i in range(num_classes)], grid, codebook_size, latent_channels,
                   (len(names), grid * grid), (len(names), 2 * latent_channels, grid, grid), names)


class EncodedMembers:
    """The check of one sample's members against the manifest: integer codes of the manifest's shape inside
    the codebook, float moments of its shape and finite (never an object array); a UserError names the member."""

    def __init__(self, manifest: dict, root):
        self.record = EncodedManifest.from_dict(manifest, root)

    def __call__(self, where: str, members: dict[str, bytes]) -> None:
        record = self.record
        codes = npy_member(where, members, "codes.npy", "i", record.codes_shape)
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= record.codebook_size:
            raise UserError(f"{where}, member codes.npy: code {low if low < 0 else high} outside the codebook "
                            f"(0..{record.codebook_size - 1})")
        moments = npy_member(where, members, "moments.npy", "f", record.moments_shape)
        if not np.isfinite(moments).all():
            raise UserError(f"{where}, member moments.npy: holds NaN or infinite values")


register_format(FORMAT, ShardFormat(MADE_BY, REQUIRED, EncodedMembers))


def read_manifest(root: str | Path, verify: bool = False) -> EncodedManifest:
    """The checked manifest of the encoded-shard folder `root` (every shard's size; sha256 with `verify`)."""
    return EncodedManifest.from_dict(load_manifest(root, FORMAT, verify), root)


def sample_codes(members: dict[str, bytes], view: int) -> np.ndarray:
    """The VQ codes [grid*grid] (int64) of one view of a sample."""
    return read_npy(members["codes.npy"])[view].astype(np.int64)


def sample_moments(members: dict[str, bytes], view: int) -> np.ndarray:
    """The KL posterior moments [2C, grid, grid] (float32) of one view of a sample."""
    return read_npy(members["moments.npy"])[view].astype(np.float32)


def first_samples(root: str | Path, count: int, with_moments: bool = True):
    """(codes [N, L] int64, labels [N] int64, moments [N, 2C, h, w] float32 or None) of the first
    `count` samples (or all, if fewer) of an encoded folder, the view that stands for the image, in shard order."""
    codes, labels, moments = [], [], []
    if count > 0:
        reader = ShardReader(root, 0, 1, manifest_kind=FORMAT)
        view = EncodedManifest.from_dict(reader.manifest, root).main_view
        for _, members in reader.raw():
            codes.append(sample_codes(members, view))
            labels.append(int(members["cls"]))
            if with_moments:
                moments.append(sample_moments(members, view))
            if len(codes) == count:
                break
    if not codes:
        raise UserError(f"{root} holds no samples")
    return (np.stack(codes), np.asarray(labels, dtype=np.int64), np.stack(moments) if moments else None)

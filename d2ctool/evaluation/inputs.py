"""Image sets for `d2c fid` / `d2c fid-ref`: ADM npz files, image folders and prepared shards, read in batches.

Every set yields uint8 NHWC batches, knows its size and a content hash (the feature cache's key):

- `NpzImages`: the `arr_0` array of an ADM-format npz ([N, H, W, 3] uint8), streamed from the file without
  loading it whole; hash: the file's sha256.
- `FolderImages`: the image files below a folder (sorted relative paths; hidden files skipped), decoded by a
  thread pool; hash: sha256 over every relative path and file's bytes.
- `ShardImages`: a `d2c prepare` output folder, in manifest order; hash: from the manifest's shard sha256s.

Folders and shards can be ADM-center-cropped to a resolution (reference images); without a crop every image
must have the same size as the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from d2ctool.errors import UserError
from d2ctool.checks import check_array
from d2ctool.identity import file_sha256
from d2ctool.io import read_npz, sha256_file
from d2ctool.evaluation.network import NUM_FEATURES, NUM_SPATIAL_FEATURES

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def default_workers(workers: int = 0) -> int:
    return workers if workers > 0 else max(1, min(8, os.cpu_count() or 1))


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decoded_batches(items: Iterable, decode: Callable, batch_size: int, workers: int) -> Iterator[np.ndarray]:
    """Decode items in a thread pool, one batch ahead of the consumer; yields uint8 NHWC arrays."""
    with ThreadPoolExecutor(default_workers(workers)) as pool:
        pending = None
        for chunk in _batched(items, batch_size):
            futures = [pool.submit(decode, item) for item in chunk]
            if pending is not None:
                yield np.stack([f.result() for f in pending])
            pending = futures
        if pending is not None:
            yield np.stack([f.result() for f in pending])


def _to_array(image, crop: int | None, what: str, expected: tuple | None) -> np.ndarray:
    from d2ctool.data.transforms import adm_center_crop

    if crop is not None:
        image = adm_center_crop(image, crop)
    array = np.asarray(image, dtype=np.uint8)
    if expected is not None and array.shape != expected:
        raise UserError(f"{what}: image is {array.shape[1]}x{array.shape[0]}, but the set's first image is "
                        f"{expected[1]}x{expected[0]}; all images must have the same size (or pass a reference "
                        "folder, which is center-cropped to fid.resolution)")
    return array


class ImageSet:
    path: Path
    kind: str
    crop: int | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def content_sha256(self) -> str:
        raise NotImplementedError

    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of every image, when known without decoding."""
        return (self.crop, self.crop) if self.crop else None

    def describe(self) -> dict:
        info = {"path": str(self.path), "kind": self.kind, "images": len(self)}
        if self.crop:
            info["adm_center_crop"] = self.crop
        return info


# ---------------------------------------------------------------- npz

def _open_member(path: Path, name: str):
    """(zipfile, member file, shape, dtype, streamable) of `name`.npy inside an npz, positioned at the data.

    Not streamable: Fortran order, object arrays or a header version numpy has no public reader for.
    """
    zf = zipfile.ZipFile(path)
    member = zf.open(f"{name}.npy")
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        with np.load(path, allow_pickle=False) as data:
            array = data[name]
        return zf, member, array.shape, array.dtype, False
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(member)
    return zf, member, shape, dtype, not fortran and not np.dtype(dtype).hasobject


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a readable npz file ({e})") from None


class NpzImages(ImageSet):
    kind = "npz"

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        keys = npz_keys(self.path)
        if key not in keys:
            raise UserError(f"{self.path}: no '{key}' array (found: {', '.join(keys) or 'none'}); an ADM image npz "
                            "holds uint8 images [N, H, W, 3] as arr_0, e.g. np.savez(path, arr_0=images)")
        try:
            zf, member, shape, dtype, streamable = _open_member(self.path, key)
        except ValueError as e:
            raise UserError(f"{self.path}: {key} is not a readable array ({e})") from None
        member.close()
        zf.close()
        self.shape, self.dtype, self.streamable = tuple(shape), np.dtype(dtype), streamable
        if len(self.shape) != 4 or self.shape[-1] != 3:
            hint = " (channels first? transpose to [N, H, W, 3])" if len(self.shape) == 4 and self.shape[1] == 3 else ""
            raise UserError(f"{self.path}: {key} has shape {self.shape}; expected RGB images [N, H, W, 3]{hint}")
        if self.dtype != np.uint8:
            raise UserError(f"{self.path}: {key} has dtype {self.dtype}; expected uint8 pixels in [0, 255] "
                            "(convert with np.clip(np.round(x), 0, 255).astype(np.uint8))")
        if self.shape[0] == 0:
            raise UserError(f"{self.path}: {key} holds no images")

    def __len__(self) -> int:
        return self.shape[0]

    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if not self.streamable:
            with np.load(self.path, allow_pickle=False) as data:
                array = data[self.key]
            for start in range(0, len(array), batch_size):
                yield np.ascontiguousarray(array[start:start + batch_size])
            return
        per_image = int(np.prod(self.shape[1:]))
        zf, member, *_ = _open_member(self.path, self.key)
        with zf, member:
            for start in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - start)
                data = member.read(n * per_image)
                if len(data) != n * per_image:
                    raise UserError(f"{self.path}: {self.key} is truncated (image {start + len(data) // per_image} "
                                    f"of {self.shape[0]}); the file is incomplete")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        return np.concatenate(list(self.batches(4096)))

    def content_sha256(self) -> str:
        if not hasattr(self, "_sha"):
            self._sha = file_sha256(self.path)
        return self._sha


# ---------------------------------------------------------------- folders

def list_images(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class FolderImages(ImageSet):
    kind = "folder"

    def __init__(self, path: str | Path, crop: int | None = None, workers: int = 0):
        self.path, self.crop, self.workers = Path(path), crop, workers
        self.files = list_images(self.path)
        if not self.files:
            raise UserError(f"{self.path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
                            "files below it)")
        empty = [p for p in self.files if p.stat().st_size == 0]
        if empty:  # before any feature is extracted
            raise UserError(f"{empty[0]}: empty file (0 bytes)" + (f", and {len(empty) - 1} more" if len(empty) > 1
                                                                   else "") + "; remove or regenerate it")
        self._first_shape = None if crop else self._decode(self.files[0], None).shape

    def __len__(self) -> int:
        return len(self.files)

    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop) if self.crop else self._first_shape[:2]

    def _decode(self, path: Path, expected) -> np.ndarray:
        from PIL import Image

        from d2ctool.data.transforms import to_rgb

        try:
            with Image.open(path) as img:
                image = to_rgb(img)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise UserError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e}); remove or replace "
                            "it") from None
        return _to_array(image, self.crop, str(path), expected)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        return _decoded_batches(self.files, lambda p: self._decode(p, self._first_shape), batch_size, self.workers)

    def content_sha256(self) -> str:
        if not hasattr(self, "_sha"):
            digest = hashlib.sha256()
            for path in self.files:
                digest.update(path.relative_to(self.path).as_posix().encode() + b"\0")
                digest.update(bytes.fromhex(sha256_file(path)))
            self._sha = digest.hexdigest()
        return self._sha


# ---------------------------------------------------------------- shards

class ShardImages(ImageSet):
    kind = "shards"

    def __init__(self, path: str | Path, crop: int | None, workers: int = 0):
        from d2ctool.data.shards import load_manifest

        self.path, self.crop, self.workers = Path(path), crop, workers
        self.manifest = load_manifest(self.path)
        self.count = sum(s["samples"] for s in self.manifest["shards"])
        if self.count == 0:
            raise UserError(f"{self.path}: the shards hold no images")

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        from d2ctool.data.reader import ShardReader, decode_image, image_member

        reader = ShardReader(self.path, 0, 1)
        expected = None if self.crop else np.asarray(next(iter(reader)).image).shape

        def decode(item):
            key, members = item
            return _to_array(decode_image(image_member(members), f"{self.path}, sample {key!r}"), self.crop,
                             f"{self.path}:{key}", expected)

        return _decoded_batches(reader.raw(), decode, batch_size, self.workers)

    def content_sha256(self) -> str:
        shards = [[s["file"], s["samples"], s["sha256"]] for s in self.manifest["shards"]]
        return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


def _manifest_format(path: Path) -> str | None:
    try:
        return json.loads((path / "manifest.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: load_manifest names the problem


def is_sample_folder(path: Path) -> bool:
    """A `d2c sample` output folder (manifest.json of format d2c-samples)."""
    from d2ctool.sampling.run import FORMAT

    return path.is_dir() and (path / "manifest.json").is_file() and _manifest_format(path) == FORMAT


def is_shard_folder(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file() and not is_sample_folder(path)


def sample_folder_images(path: Path) -> ImageSet:
    """A `d2c sample` folder's images: its samples.npz, or its images/ when the npz is absent."""
    if (path / "samples.npz").is_file():
        return NpzImages(path / "samples.npz")
    if (path / "images").is_dir():
        return FolderImages(path / "images")
    raise UserError(f"{path}: a `d2c sample` folder without samples.npz or images/; re-run the `d2c sample` "
                    "command that made it")


def open_images(path: str | Path, *, crop: int | None = None, workers: int = 0, what: str = "images") -> ImageSet:
    """An image set from a path: an npz (arr_0), a shard folder (manifest.json) or a folder of images."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise UserError(f"{path}: {what} must be an ADM-format .npz file, an image folder or a shard folder")
        return NpzImages(path)
    if is_sample_folder(path):
        return sample_folder_images(path)
    if is_shard_folder(path):
        return ShardImages(path, crop, workers)
    return FolderImages(path, crop, workers)


# ---------------------------------------------------------------- reference npz

@dataclass
class ReferenceNpz:
    """An ADM reference batch: precomputed statistics and/or reference images, plus d2c's metadata if ours."""

    path: Path
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # any of mu, sigma, mu_s, sigma_s
    images: NpzImages | None = None
    meta: dict | None = None  # the d2c_meta JSON of a `d2c fid-ref` file; None for the official files

    @property
    def has_stats(self) -> bool:
        return "mu" in self.stats and "sigma" in self.stats

    @property
    def has_spatial_stats(self) -> bool:
        return "mu_s" in self.stats and "sigma_s" in self.stats


def load_reference_npz(path: str | Path) -> ReferenceNpz:
    """An ADM reference batch, every array and the metadata checked before any feature is extracted: mu/sigma
    and mu_s/sigma_s in pairs, float, finite, of the Inception feature sizes; arr_0 uint8 images; d2c_meta JSON."""
    path = Path(path)
    keys = npz_keys(path)
    remedy = ("use an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz or write a new one with "
              "`d2c fid-ref`")
    arrays = read_npz(path, [*STAT_KEYS, "d2c_meta"], remedy)
    ref = ReferenceNpz(path)
    for mean, cov, dim in (("mu", "sigma", NUM_FEATURES), ("mu_s", "sigma_s", NUM_SPATIAL_FEATURES)):
        if (mean in arrays) != (cov in arrays):
            have, lack = (mean, cov) if mean in arrays else (cov, mean)
            raise UserError(f"{path}: has {have} without {lack}; a reference needs both (or neither, with images)")
        if mean in arrays:
            ref.stats[mean] = check_array(arrays[mean], f"{path}: {mean}", kinds="f", shape=(dim,), finite=True,
                                          remedy=remedy).astype(np.float64)
            ref.stats[cov] = check_array(arrays[cov], f"{path}: {cov}", kinds="f", shape=(dim, dim), finite=True,
                                         remedy=remedy).astype(np.float64)
    if "d2c_meta" in arrays:
        meta = arrays["d2c_meta"]
        try:
            ref.meta = json.loads(str(meta)) if meta.ndim == 0 and meta.dtype.kind == "U" else None
        except ValueError:
            ref.meta = None
        if not isinstance(ref.meta, dict) or not isinstance(ref.meta.get("extractor", {}), dict):
            raise UserError(f"{path}: d2c_meta is not the JSON object `d2c fid-ref` writes; {remedy}")
    if "arr_0" in keys:
        ref.images = NpzImages(path)
    if not ref.has_stats and ref.images is None:
        raise UserError(f"{path}: neither reference statistics (mu, sigma) nor reference images (arr_0) found "
                        f"(keys: {', '.join(keys) or 'none'}); {remedy}")
    return ref

"""Read image shards back as (RGB image, label), split across DDP ranks and DataLoader workers.

The shards of one epoch form a single stream (in manifest order, or a seeded permutation of the
shards when shuffling). Rank r of W reads the contiguous slice [r*n, (r+1)*n) of that stream with
n = total // W, so every rank yields exactly the same number of samples however uneven the shards
are, and reads only the shards its slice touches. The last total % W samples of an epoch are
dropped; a different shard order each epoch drops different ones.

The order of a rank's samples depends only on the manifest, the seed and the epoch, never on the bytes:
`positions()` gives it as (shard, sample) pairs without reading anything, and `index_tar` finds where
each sample's members lie in a shard from its tar headers alone (512 bytes a member). Together they let
DataLoader workers read only the bytes of their own samples (`d2ctool.data.torch_dataset.ShardDataset`).

Every sample is validated (`d2ctool.data.members.SampleCheck`: label, image present, encoded `.npy`
members' dtype, shape, values) before it is yielded or decoded, on both paths (`raw()` and the
workers' reads), so a bad one is a one-line error naming shard and key.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from d2ctool.data.members import SampleCheck, decode_failure
from d2ctool.data.shards import IMAGE_FORMAT, iter_tar, load_manifest
from d2ctool.data.transforms import to_rgb
from d2ctool.distributed import rank_and_world
from d2ctool.errors import UserError


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB
    label: int
    members: dict[str, bytes]  # every raw tar member of the sample, by extension


def decode_image(data: bytes, where: str | None = None) -> Image.Image:
    """Decode stored image bytes to RGB (grayscale, CMYK and palette convert; alpha is dropped).

    Bytes that do not decode are a UserError naming the sample (`where`, else the one last read).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise decode_failure(e, where) from None


def image_member(members: dict[str, bytes]) -> bytes:
    for ext in ("jpg", "png", "webp", "bmp"):
        if ext in members:
            return members[ext]
    raise KeyError(f"no image member among {sorted(members)}")


def split_stream(counts: list[int], order: list[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """Pieces (shard index, start, stop) of rank's slice of the stream: shards in `order`, concatenated.

    Every rank gets total // world samples.
    """
    per_rank = sum(counts) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces, offset = [], 0
    for shard in order:
        start, stop = max(lo, offset), min(hi, offset + counts[shard])
        if start < stop:
            pieces.append((shard, start - offset, stop - offset))
        offset += counts[shard]
    return pieces


class ShardReader:
    """Iterate the samples of a prepared shard folder that belong to one rank.

    rank/world default to torchrun's environment. With `shuffle`, the shard order is a permutation
    seeded by (seed, epoch) and `shuffle_buffer` samples are mixed locally. `skip` drops the first
    samples of this rank's stream without decoding them (resuming mid-epoch).
    """

    def __init__(self, root: str | Path, rank: int | None = None, world_size: int | None = None, *,
                 shuffle: bool = False, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0, skip: int = 0,
                 manifest_kind: str = IMAGE_FORMAT):
        self.root = Path(root)
        self.manifest = load_manifest(self.root, manifest_kind)
        env_rank, env_world = rank_and_world()
        self.rank = env_rank if rank is None else rank
        self.world = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.shuffle_buffer, self.skip = shuffle_buffer, skip
        self.check = SampleCheck(self.manifest, self.root)
        self.counts = [s["samples"] for s in self.manifest["shards"]]
        self.classes: list[str] = self.manifest["classes"]

    def __len__(self) -> int:
        return max(sum(self.counts) // self.world - self.skip, 0)

    def shard_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.counts)))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.counts)).tolist()

    def _mixed(self, stream):
        """The local shuffle buffer over a stream (of samples, or of their positions: the same order)."""
        if not (self.shuffle and self.shuffle_buffer > 1):
            return stream
        return _buffer_shuffle(stream, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, self.rank]))

    def shard_path(self, shard: int) -> Path:
        return self.root / self.manifest["shards"][shard]["file"]

    def positions(self) -> list[tuple[int, int]]:
        """(shard, sample within the shard) of this rank's stream, shuffled if asked, after `skip`; nothing is read.
        The same order as `raw()`."""
        pieces = split_stream(self.counts, self.shard_order(), self.rank, self.world)
        stream = ((shard, i) for shard, start, stop in pieces for i in range(start, stop))
        stream = self._mixed(stream)
        return list(stream)[self.skip:]

    def raw(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Undecoded (key, members) of this rank's slice, shuffled if asked, after `skip`."""
        pieces = split_stream(self.counts, self.shard_order(), self.rank, self.world)
        stream = ((shard, *s) for shard, start, stop in pieces for s in iter_tar(self.shard_path(shard), start, stop))
        stream = self._mixed(stream)
        for index, (shard, key, members) in enumerate(stream):
            if index >= self.skip:
                self.check(self.shard_path(shard), key, members)  # validated here, before anything decodes it
                yield key, members

    def __iter__(self) -> Iterator[Sample]:
        for key, members in self.raw():
            yield Sample(key, decode_image(image_member(members)), int(members["cls"]), members)


@dataclass(frozen=True)
class ShardIndex:
    """Where every member of a shard's samples lies: sample i owns members first[i]:first[i+1]."""

    first: np.ndarray  # [samples + 1] int64
    offsets: np.ndarray  # [members] int64: byte offset of each member's data in the tar
    sizes: np.ndarray  # [members] int64
    exts: tuple[str, ...]  # [members]: the part of each name after the key (`cls`, `codes.npy`, ...)
    keys: tuple[str, ...]  # [samples]

    def read(self, fd: int, sample: int) -> dict[str, bytes]:
        """The members of one sample, read from an open shard with one pread each."""
        lo, hi = int(self.first[sample]), int(self.first[sample + 1])
        return {self.exts[m]: os.pread(fd, int(self.sizes[m]), int(self.offsets[m])) for m in range(lo, hi)}


def index_tar(path: str | Path) -> ShardIndex:
    """Index a shard from its tar headers alone: unbuffered reads of 512-byte headers, seeks over the data.
    Cached per file version (path, size, mtime), so a process indexes a shard once for all epochs."""
    st = os.stat(path)
    return _index_tar(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _index_tar(path: str, size: int, mtime_ns: int) -> ShardIndex:
    first, offsets, sizes, exts, keys = [], [], [], [], []
    try:
        _index_members(path, first, offsets, sizes, exts, keys)
    except (tarfile.TarError, EOFError) as e:  # OS faults pass on: the CLI names their path
        where = f", after sample {keys[-1]!r}" if keys else ""
        raise UserError(f"shard {path}: damaged tar{where} ({type(e).__name__}: {e}); "
                        "rebuild the shard folder with the command that wrote it") from None
    first.append(len(offsets))
    return ShardIndex(np.asarray(first, np.int64), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64),
                      tuple(exts), tuple(keys))


def _index_members(path: str, first: list, offsets: list, sizes: list, exts: list, keys: list) -> None:
    key = None
    with open(path, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, _, basename = info.name.rpartition("/")
            stem, _, ext = basename.partition(".")  # the key rule of `iter_tar`
            this_key = f"{folder}/{stem}" if folder else stem
            if this_key != key:
                first.append(len(offsets))
                keys.append(this_key)
                key = this_key
            offsets.append(info.offset_data)
            sizes.append(info.size)
            exts.append(ext)


def _buffer_shuffle(stream, size: int, rng: np.random.Generator):
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer

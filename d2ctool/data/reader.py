"""Read image shards back as (RGB image, label), split across DDP ranks and DataLoader workers.

The shards of one epoch form a single stream (in manifest order, or a seeded permutation of the
shards when shuffling). Rank r of W reads the contiguous slice [r*n, (r+1)*n) of that stream with
n = total // W, so every rank yields exactly the same number of samples however uneven the shards
are, and reads only the shards its slice touches. The last total % W samples of an epoch are
dropped; a different shard order each epoch drops different ones.

Every sample is validated (`d2ctool.data.members.SampleCheck`: label, image present, encoded `.npy`
members' dtype, shape, values) when it is yielded, so a bad one is a one-line error naming shard and key.

`d2ctool.data.torch_dataset.ShardDataset` turns a reader into batches for a DataLoader.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from d2ctool.data.members import SampleCheck, decode_failure
from d2ctool.data.shards import iter_tar, load_manifest
from d2ctool.distributed import rank_and_world


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
            return img.convert("RGB")
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
                 manifest_kind: str = "d2c-image-shards"):
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

    def raw(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Undecoded (key, members) of this rank's slice, shuffled if asked, after `skip`."""
        pieces = split_stream(self.counts, self.shard_order(), self.rank, self.world)
        files = [self.root / entry["file"] for entry in self.manifest["shards"]]
        stream = ((files[shard], *s) for shard, start, stop in pieces for s in iter_tar(files[shard], start, stop))
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _buffer_shuffle(stream, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, self.rank]))
        for index, (file, key, members) in enumerate(stream):
            if index >= self.skip:
                self.check(file, key, members)  # every sample is validated here, before anything decodes it
                yield key, members

    def __iter__(self) -> Iterator[Sample]:
        for key, members in self.raw():
            yield Sample(key, decode_image(image_member(members)), int(members["cls"]), members)


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

"""Batches from a ShardReader for a torch DataLoader, identical whatever the number of workers.

The rank's stream order is computed without reading (`ShardReader.positions`) and the shards it touches
are indexed from their tar headers once, in the main process, before the workers start. The stream is
cut into batches; batch j is read and decoded by DataLoader worker (j - skip) % W, which reads exactly
the bytes of its own samples (one pread a member), so an epoch reads each byte of the rank's data once
whatever W is. A DataLoader with `batch_size=None` returns workers' items round-robin, so batches arrive
in stream order: 0, 1, 2, ... Random choices in `decode` draw from a generator seeded by (seed, epoch,
rank, position in the stream), so a run resumed at batch k sees exactly the batches an uninterrupted
run would have seen. Every sample is validated by the reader's `SampleCheck` before `decode` sees it.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from d2ctool.data.reader import ShardReader, decode_image, image_member, index_tar
from d2ctool.errors import UserError


class ShardDataset(IterableDataset):
    """Yields collated batches of `decode(members, rng)`; `len()` is the number of full batches."""

    def __init__(self, reader: ShardReader, decode: Callable[[dict, np.random.Generator], Any], batch_size: int,
                 seed: int = 0, skip_batches: int = 0):
        assert reader.skip == 0, "skip whole batches with skip_batches"
        self.reader, self.decode, self.batch_size = reader, decode, batch_size
        self.seed, self.skip_batches = seed, skip_batches
        self.total_batches = len(reader) // batch_size
        used = reader.positions()[:self.total_batches * batch_size]
        self.shards = np.asarray([shard for shard, _ in used], np.int32)
        self.samples = np.asarray([sample for _, sample in used], np.int64)
        self.paths = {int(s): str(reader.shard_path(int(s))) for s in np.unique(self.shards)}
        self.index = {s: index_tar(path) for s, path in self.paths.items()}
        for s, path in self.paths.items():  # a tar cut at a 512-byte boundary indexes as a shorter shard
            if len(self.index[s].keys) != reader.counts[s]:
                raise UserError(f"shard {path}: holds {len(self.index[s].keys)} samples, its manifest says "
                                f"{reader.counts[s]}; the file is truncated or was replaced: rebuild the shard "
                                "folder with the command that wrote it")

    def __len__(self) -> int:
        return max(self.total_batches - self.skip_batches, 0)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        files: dict[int, int] = {}
        try:
            for j in range(self.skip_batches + worker, self.total_batches, workers):
                batch = []
                for index in range(j * self.batch_size, (j + 1) * self.batch_size):
                    shard = int(self.shards[index])
                    if shard not in files:
                        files[shard] = os.open(self.paths[shard], os.O_RDONLY)
                    sample = int(self.samples[index])
                    members = self.index[shard].read(files[shard], sample)
                    self.reader.check(self.paths[shard], self.index[shard].keys[sample], members)
                    rng = np.random.default_rng([self.seed, self.reader.epoch, self.reader.rank, index])
                    batch.append(self.decode(members, rng))
                yield default_collate(batch)
        finally:
            for fd in files.values():
                os.close(fd)


def decode_rgb(members: dict, rng: np.random.Generator):
    """(PIL RGB image, label): the plain decoder, for custom transforms."""
    return decode_image(image_member(members)), int(members["cls"])

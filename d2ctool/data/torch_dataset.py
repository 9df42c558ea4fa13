"""Batches from a ShardReader for a torch DataLoader, identical whatever the number of workers.

The rank's stream is cut into batches; batch j is decoded by DataLoader worker (j - skip) % W, and a
DataLoader with `batch_size=None` returns workers' items round-robin, so batches arrive in stream
order: 0, 1, 2, ... Random choices in `decode` draw from a generator seeded by (seed, epoch, rank,
position in the stream), so a run resumed at batch k sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from d2ctool.data.reader import ShardReader, decode_image, image_member


class ShardDataset(IterableDataset):
    """Yields collated batches of `decode(members, rng)`; `len()` is the number of full batches."""

    def __init__(self, reader: ShardReader, decode: Callable[[dict, np.random.Generator], Any], batch_size: int,
                 seed: int = 0, skip_batches: int = 0):
        assert reader.skip == 0, "skip whole batches with skip_batches"
        self.reader, self.decode, self.batch_size = reader, decode, batch_size
        self.seed, self.skip_batches = seed, skip_batches

    def __len__(self) -> int:
        return max(len(self.reader) // self.batch_size - self.skip_batches, 0)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        total_batches = len(self.reader) // self.batch_size
        batch = []
        for index, (_, members) in enumerate(self.reader.raw()):
            j = index // self.batch_size
            if j >= total_batches:
                break
            if j < self.skip_batches or (j - self.skip_batches) % workers != worker:
                continue
            rng = np.random.default_rng([self.seed, self.reader.epoch, self.reader.rank, index])
            batch.append(self.decode(members, rng))
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []


def decode_rgb(members: dict, rng: np.random.Generator):
    """(PIL RGB image, label): the plain decoder, for custom transforms."""
    return decode_image(image_member(members)), int(members["cls"])

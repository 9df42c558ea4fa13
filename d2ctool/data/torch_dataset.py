"""A torch IterableDataset over a ShardReader: DataLoader workers split the rank's slice between them."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import IterableDataset, get_worker_info

from d2ctool.data.reader import ShardReader, decode_image, image_member


class ImageShardDataset(IterableDataset):
    """Yields (transform(RGB image), label). Every rank yields len(reader) samples per epoch."""

    def __init__(self, reader: ShardReader, transform: Callable | None = None):
        self.reader, self.transform = reader, transform

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        self.reader.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        for _, members in self.reader.raw(part, parts):
            image = decode_image(image_member(members))
            yield (self.transform(image) if self.transform else image), torch.tensor(int(members["cls"]))

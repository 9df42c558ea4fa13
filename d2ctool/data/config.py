"""Recipe section `prepare`: how image folders become shards."""

from __future__ import annotations

from dataclasses import dataclass

from d2ctool.config import bounded, nested


@dataclass
class SyntheticConfig:
    """The built-in procedural data set (source `synthetic`)."""

    num_classes: int = bounded(10, min=1)
    images_per_class: int = bounded(100, min=1)
    resolution: int = bounded(64, min=8, max=4096)


@dataclass
class PrepareConfig:
    name: str = "images"  # shards are NAME-000000.tar, ...
    shard_size: int = bounded(1000, min=1)  # source files per shard (rejected ones leave a shard a little short)
    seed: int = 0  # global shuffle order
    workers: int = bounded(0, min=0)  # verification processes; 0 = one per CPU core (does not change the output)
    labels: str | None = None  # flat folder (e.g. ImageNet val): labels file, see docs/data.md
    classes: str | None = None  # class order: a text file (one name per line) or a prepare manifest.json
    synthetic: SyntheticConfig = nested(SyntheticConfig)

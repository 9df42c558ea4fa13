"""Seconds per image of a sampling chain, measured in this process: warm-up batches first (not counted),
then timed batches, split into stage 1, stage 2 and decoding (see `generate_batch`)."""

from __future__ import annotations

import platform

import numpy as np
import torch

from d2ctool.sampling.chain import Chain, generate_batch, make_labels


def time_chain(chain: Chain, warmup_batches: int = 1, timing_batches: int = 2) -> dict:
    """Images/s and seconds per image of each part, over `timing_batches` batches of sample.batch_size
    images (the run's own labels, cycled), after `warmup_batches` uncounted ones."""
    cfg = chain.cfg
    labels = make_labels(cfg, chain.num_classes, chain)
    batch = min(cfg.batch_size, len(labels))
    for k in range(warmup_batches):
        generate_batch(chain, np.resize(labels, batch), k * batch, {})
    parts: dict = {}
    for k in range(timing_batches):
        generate_batch(chain, np.resize(labels, batch), k * batch, parts)
    images = batch * timing_batches
    total = sum(parts.values())
    return {"images_per_second": images / total if total > 0 else None,
            "seconds_per_image": {part: seconds / images for part, seconds in parts.items()},
            "images": images, "batch_size": batch, "warmup_batches": warmup_batches,
            "threads": torch.get_num_threads(), "device": str(chain.device), "torch": torch.__version__,
            "host": platform.node(), "processor": platform.processor() or platform.machine()}

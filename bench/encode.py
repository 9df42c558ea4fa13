"""Benchmark the encoders behind `d2c encode`: images/s (each image also encoded h-flipped).

    python bench/encode.py                                   # small presets on the CPU
    python bench/encode.py --vq vq-16 --kl kl-16 --resolution 256 --batch 64 256   # on a GPU, bf16

Random weights (speed does not depend on them). Measures the tokenizers' forward passes on
uint8 batches already in memory, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from d2ctool.tokenizers.encode import check_grids, encode_images
from d2ctool.tokenizers.load import build_tokenizer, preset_config


def measure(vq_name: str, kl_name: str, resolution: int, batch: int, device: torch.device, seconds: float) -> dict:
    vq = build_tokenizer("vq", preset_config("vq", vq_name)).eval().to(device)
    kl = build_tokenizer("kl", preset_config("kl", kl_name)).eval().to(device)
    check_grids(resolution, vq, kl, vq_name, kl_name)
    image = np.random.default_rng(0).integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    images = np.stack([image, image[:, :, ::-1]], axis=1)  # and its h-flip: encode's default views
    autocast = device.type == "cuda"
    encode_images(vq, kl, images, device, autocast)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        encode_images(vq, kl, images, device, autocast)
        done += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"vq": vq_name, "kl": kl_name, "resolution": resolution, "batch": batch, "device": str(device),
            "precision": "bf16" if autocast else "fp32", "threads": torch.get_num_threads(),
            "images_per_s": round(done / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vq", default=None)
    parser.add_argument("--kl", default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = ([(args.vq, args.kl, args.resolution)] if args.vq else
               [("vq-tiny-s4", "kl-tiny-s4", 32), ("vq-tiny-s4", "kl-tiny-s4", 64), ("vq-tiny-s8", "kl-tiny-s8", 64)])
    for vq_name, kl_name, resolution in configs:
        for batch in args.batch:
            print(json.dumps(measure(vq_name, kl_name, resolution, batch, device, args.seconds)), flush=True)


if __name__ == "__main__":
    main()

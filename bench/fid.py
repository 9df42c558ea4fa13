"""Benchmark `d2c fid` feature extraction: images/s of the Inception forward pass (and of a PNG folder end to end).

    python bench/fid.py [--images 48] [--batch-sizes 16 32] [--threads 1 2] [--device cpu] [--inception-weights PATH]

`network`: in-memory uint8 images at 299x299 (the network's input size, so the resize is the identity) through
the extractor in legacy_tensorflow mode. `folder`: 256x256 PNGs decoded, resized (legacy_tensorflow inside the
network, clean with PIL bicubic) and run through the network, as `d2c fid` does (no feature cache).
inception-random has the real network's architecture and cost; pass --inception-weights to time the real file too.
`--threads`: torch intra-op threads (on a shared machine, one thread can beat an oversubscribed pool).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d2ctool.data import synthetic
from d2ctool.evaluation.cache import FeatureCache
from d2ctool.evaluation.features import Extractor
from d2ctool.evaluation.inputs import FolderImages
from d2ctool.evaluation.reference import extract_features


def images_at(size: int, count: int) -> np.ndarray:
    return np.stack([synthetic.render(i, 10, size, 0)[0] for i in range(count)])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inception-weights", default=None)
    args = parser.parse_args()
    networks = ["inception-random"] + (["inception"] if args.inception_weights else [])
    at_299 = images_at(299, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "samples"
        folder.mkdir()
        for i, image in enumerate(images_at(256, args.images)):
            Image.fromarray(image).save(folder / f"{i:06d}.png")
        for threads in args.threads:
            torch.set_num_threads(threads)
            base = {"device": args.device, "torch_threads": threads}
            for network in networks:
                for batch_size in args.batch_sizes:
                    ext = Extractor(network, "legacy_tensorflow", args.inception_weights, device=args.device,
                                    batch_size=batch_size, download=False)
                    ext(at_299[:2])  # warm-up
                    seconds = timed(lambda: ext(at_299))
                    print(json.dumps({"bench": "network", "extractor": network, "input": "299x299", **base,
                                      "batch_size": batch_size, "images": args.images, "seconds": round(seconds, 2),
                                      "images_per_s": round(args.images / seconds, 2)}), flush=True)
            for mode in ("legacy_tensorflow", "clean"):
                batch_size = max(args.batch_sizes)
                ext = Extractor("inception-random", mode, device=args.device, batch_size=batch_size)
                ext(at_299[:2])
                seconds = timed(lambda: extract_features(FolderImages(folder), ext, FeatureCache(None),
                                                         f"bench {mode}"))
                print(json.dumps({"bench": "folder", "extractor": "inception-random", "mode": mode,
                                  "input": "256x256 PNG", **base, "batch_size": batch_size, "images": args.images,
                                  "seconds": round(seconds, 2), "images_per_s": round(args.images / seconds, 2)}),
                      flush=True)


if __name__ == "__main__":
    main()

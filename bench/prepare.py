"""Benchmark `d2c prepare`: images/s over a generated folder of 256-500 px JPEGs, with 1 and 2 workers.

    python bench/prepare.py [--images 600] [--workers 1 2]

Images are the synthetic set rendered at random sizes, with grain, saved as JPEG (quality 90): about
the size and decoding cost of ImageNet files. The time covers listing, reading, full decoding, and writing the shards.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from d2ctool.data import synthetic
from d2ctool.data.prepare import prepare
from d2ctool.recipe import load_recipe, recipe_yaml


def make_folder(root: Path, num_images: int, num_classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        size = int(rng.integers(256, 501))
        pixels, label = synthetic.render(i, num_classes, size, seed)
        width = int(rng.integers(256, 501))
        pixels = pixels.astype(np.int16) + rng.integers(-12, 13, size=pixels.shape)  # camera-like grain
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((width, size))
        folder = root / f"class{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        (folder / f"img_{i:06d}.JPEG").write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        make_folder(src, args.images)
        total_mb = sum(p.stat().st_size for p in src.rglob("*.JPEG")) / 2**20
        results = []
        for workers in args.workers:
            out = Path(tmp) / f"out{workers}"
            recipe = load_recipe(None, [f"workers={workers}", "shard_size=100"], "prepare")
            start = time.perf_counter()
            result = prepare(str(src), out, recipe.prepare, recipe_yaml(recipe))
            seconds = time.perf_counter() - start
            results.append({"workers": workers, "images": result.num_samples, "seconds": round(seconds, 2),
                            "images_per_s": round(result.num_samples / seconds, 1),
                            "MB_per_s": round(total_mb / seconds, 1)})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()

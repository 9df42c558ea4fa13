"""Benchmark the training data loader: bytes read per epoch and samples/s, for several DataLoader worker counts.

    python bench/loader.py                                  # 8,000 samples, 1, 4 and 8 workers
    python bench/loader.py --samples 20000 --workers 1 4 8 --batch 64

It writes encoded shards of the ImageNet-256 shapes `d2c encode` produces with the official tokenizers
(codes int16 [2, 256], KL moments float16 [2, 32, 16, 16], cls; random content) into a temporary folder,
then reads one epoch per worker count with `ShardDataset` and train-continuous's decode (a latent drawn
from the moments, the codes of the same flip). Bytes are `rchar` of /proc/<pid>/io: bytes returned by
read system calls, page-cache hits included (what a loader asks of the file system; `read_bytes` counts
only disk reads and is 0 for cached files). Shard bytes read = the main process while it indexes the
shards' tar headers (the header cache is cleared before each run: a first epoch) + every worker while it
iterates; compared with the shards' size. The main process's reads while batches arrive are the
DataLoader's transfer of decoded batches from the workers, not shard reads: reported apart.

The samples/s a training step consumes per GPU come from `d2c plan` on the shipped GPT-B and MAR-B
recipes: peak bf16 FLOP/s x MFU / training FLOPs per image (the recipe's GPU and MFU assumptions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from torch.utils.data import DataLoader

from d2ctool.continuous.train import ContinuousTask
from d2ctool.data import reader as reader_module
from d2ctool.data.encoded import FORMAT as ENCODED, read_manifest
from d2ctool.data.reader import ShardReader
from d2ctool.data.shards import npy_bytes, shard_name, write_tar
from d2ctool.data.torch_dataset import ShardDataset
from d2ctool.io import write_json
from d2ctool.runstate import MANIFEST
from d2ctool.tokenizers.latent_norm import LatentNorm

REPO = Path(__file__).resolve().parents[1]
GRID, CHANNELS, VOCAB, SCALE = 16, 16, 16384, 0.2325  # VQ-16 and KL-16 at 256 px


def rchar(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/<pid>/io")


def write_encoded(root: Path, samples: int, shard_size: int, seed: int = 0) -> int:
    """Encoded shards of the official shapes; returns their total size in bytes."""
    rng = np.random.default_rng(seed)
    shards, key = [], 0
    for k in range(-(-samples // shard_size)):
        rows = []
        for _ in range(min(shard_size, samples - k * shard_size)):
            codes = rng.integers(0, VOCAB, (2, GRID * GRID)).astype(np.int16)
            moments = rng.standard_normal((2, 2 * CHANNELS, GRID, GRID)).astype(np.float16)
            rows.append((f"{key:08d}", {"codes.npy": npy_bytes(codes), "moments.npy": npy_bytes(moments),
                                        "cls": str(int(rng.integers(1000))).encode()}))
            key += 1
        write_tar(root / shard_name("train", k), rows)
        shards.append({"file": shard_name("train", k), "samples": len(rows)})
    write_json(root / MANIFEST, {
        "format": ENCODED, "classes": [str(i) for i in range(1000)], "class_counts": {}, "shards": shards,
        "resolution": 256, "grid": [GRID, GRID], "scale_factor": SCALE,
        "codes": {"dtype": "int16", "shape": [2, GRID * GRID]},
        "moments": {"dtype": "float16", "shape": [2, 2 * CHANNELS, GRID, GRID]},
        "tokenizers": {"vq": {"codebook_size": VOCAB}, "kl": {"latent_channels": CHANNELS}}})
    return sum((root / s["file"]).stat().st_size for s in shards)


class MeasuredDataset(ShardDataset):
    """Each worker (or the main process, without workers) writes the bytes it read while iterating."""

    def __init__(self, *args, log_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_dir = log_dir

    def __iter__(self):
        start = rchar()
        yield from super().__iter__()
        (self.log_dir / f"{os.getpid()}.json").write_text(json.dumps(rchar() - start))


def epoch(root: Path, workers: int, batch: int, log_dir: Path) -> dict:
    for f in log_dir.glob("*.json"):
        f.unlink()
    task = SimpleNamespace(norm=LatentNorm.scalar(SCALE), manifest=read_manifest(root))  # what decode reads
    decode = functools.partial(ContinuousTask.decode, task)
    reader_module._index_tar.cache_clear()
    main_start = rchar()
    start = time.perf_counter()
    reader = ShardReader(root, 0, 1, shuffle=True, seed=0, epoch=0, shuffle_buffer=1000, manifest_kind=ENCODED)
    dataset = MeasuredDataset(reader, decode, batch, seed=0, log_dir=log_dir)
    main_index = rchar() - main_start  # manifest + tar headers
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    batches = sum(1 for _ in loader)
    seconds = time.perf_counter() - start
    main_rest = rchar() - main_start - main_index
    worker_bytes = [json.loads(f.read_text()) for f in log_dir.glob("*.json")]
    # the kernel adds a reaped child's counters to its parent's, and without workers the main process read
    # the data itself: either way the workers' bytes are in the main process's count once already
    main_rest -= sum(worker_bytes)
    return {"workers": workers, "batches": batches, "samples": batches * batch, "seconds": round(seconds, 2),
            "samples_per_s": round(batches * batch / seconds, 1), "index_bytes": main_index,
            "worker_bytes": sorted(worker_bytes), "shard_bytes_read": main_index + sum(worker_bytes),
            "main_batch_transfer_bytes": main_rest}


def consumption() -> dict:
    """Images/s one GPU's training step consumes, from `d2c plan` on the shipped recipes."""
    from d2ctool.plan import GPUS, plan_recipe
    from d2ctool.recipe import load_recipe

    out = {}
    for name, stage in (("llamagen-b", "train-discrete"), ("mar-b", "train-continuous")):
        recipe = load_recipe(REPO / "recipes" / "imagenet256" / f"{name}.yaml")
        (s,) = [s for s in plan_recipe(recipe, name).stages if s.name == stage]
        gpu = GPUS[recipe.plan.gpu]
        out[s.model] = {"gpu": gpu.name, "mfu": recipe.plan.mfu,
                        "images_per_s_per_gpu": round(gpu.bf16_flops * recipe.plan.mfu / s.train_flops, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2c-bench-loader-") as tmp:
        root, logs = Path(tmp) / "encoded", Path(tmp) / "logs"
        root.mkdir()
        logs.mkdir()
        shard_bytes = write_encoded(root, args.samples, args.shard_size)
        used = args.samples // args.batch * args.batch
        results = {"shard_bytes": shard_bytes, "samples": args.samples, "epoch_samples": used,
                   "cpu_cores": os.cpu_count(), "byte_counter": "rchar (/proc/<pid>/io)", "runs": []}
        for workers in args.workers:
            run = epoch(root, workers, args.batch, logs)
            run["read_over_shard_bytes"] = round(run["shard_bytes_read"] / shard_bytes, 4)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    results["consumed_per_gpu"] = consumption()
    print(json.dumps({"shard_bytes": shard_bytes, "consumed_per_gpu": results["consumed_per_gpu"]}))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()

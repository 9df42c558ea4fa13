"""`d2c prepare`: a source of images -> shuffled webdataset shards, a manifest and a list of rejects.

The source is listed (sorted), shuffled once with the recipe seed, and cut into shards of
`shard_size` files. Each shard's files are read and fully decoded by worker processes; the ones
that decode are written, bytes untouched, to a temporary tar that is renamed into place when
complete. A per-shard record in OUT/.d2c-prepare/ makes the run resumable: a re-run skips every
finished shard. The manifest is written last, so its presence means the whole run is done.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import threading
from contextlib import closing
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from d2ctool import __version__
from d2ctool.config import to_dict
from d2ctool.data.config import PrepareConfig
from d2ctool.data.shards import IMAGE_FORMAT as FORMAT, REJECTED, shard_name, write_tar
from d2ctool.data.sources import SYNTHETIC, Source, scan_source
from d2ctool.data.verify import load_file, load_synthetic
from d2ctool.errors import UserError
from d2ctool.io import atomic_path, sha256_file, write_text
from d2ctool.progress import Progress, info
from d2ctool.runstate import MANIFEST, OutputFolder

STATE_DIR = ".d2c-prepare"  # OutputFolder(out, "prepare", ...).state


@dataclass
class PrepareResult:
    out: Path
    num_samples: int
    num_rejected: int
    num_shards: int
    shards_written: int  # by this run
    already_complete: bool = False
    images_per_second: float = 0.0


def sample_keys(source: Source) -> list[str]:
    """A unique key without dots per item: the relative path's characters kept where safe."""
    if source.kind == SYNTHETIC:
        return [f"synthetic_{i:08d}" for i in source.refs]
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", ref.rsplit(".", 1)[0].replace("/", "__")) for ref in source.refs]
    seen = Counter(keys)
    return [k if seen[k] == 1 else f"{k}_{i}" for i, k in enumerate(keys)]


def _plan(cfg: PrepareConfig, source: Source) -> dict:
    """Everything that decides the output: a different plan means different shards."""
    settings = to_dict(cfg)
    settings.pop("workers")
    if source.kind != SYNTHETIC:
        settings.pop("synthetic")
    return {"prepare": settings, "source": source.fingerprint()}


def _loader(source: Source, cfg: PrepareConfig):
    if source.kind == SYNTHETIC:
        syn = cfg.synthetic
        return partial(load_synthetic, syn.num_classes, syn.resolution, cfg.seed)
    return partial(load_file, source.root)


def _load_in_parallel(load, refs: list, workers: int, max_in_flight: int) -> Iterator[dict]:
    """load(ref) for every ref, in order, in `workers` processes, with at most `max_in_flight` results held."""
    if workers <= 1:
        yield from map(load, refs)
        return
    slots, stop = threading.Semaphore(max_in_flight), threading.Event()

    def feed():  # runs in the pool's task-feeding thread: blocks while the consumer is behind
        for ref in refs:
            slots.acquire()
            if stop.is_set():
                return
            yield ref

    # spawn, not fork: the progress bar runs a thread, and forking a threaded process is unsafe
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        try:
            for result in pool.imap(load, feed(), chunksize=4):
                slots.release()
                yield result
        finally:
            stop.set()
            for _ in range(max_in_flight + 1):
                slots.release()


def _write_shard(folder: OutputFolder, name: str, index: int, samples: list, rejected: list,
                 class_counts: Counter) -> None:
    record = {"file": shard_name(name, index) if samples else None, "samples": len(samples), "rejected": rejected,
              "class_counts": {str(k): v for k, v in sorted(class_counts.items())}}
    if not samples:  # every file of this shard was rejected: no tar
        folder.write_record(index, record)
        return
    with atomic_path(folder.root / record["file"]) as tmp:
        write_tar(tmp, samples)
        record.update(sha256=sha256_file(tmp), bytes=tmp.stat().st_size)
        folder.write_record(index, record)


def prepare(src: str, out: str | Path, cfg: PrepareConfig, resolved_config: str) -> PrepareResult:
    source = scan_source(src, cfg)
    out = Path(out)
    folder = OutputFolder(out, "prepare", _plan(cfg, source))
    if folder.check():
        manifest = json.loads((out / MANIFEST).read_text())
        return PrepareResult(out, manifest["num_samples"], manifest["num_rejected"], len(manifest["shards"]), 0,
                             already_complete=True)
    folder.start(resolved_config)

    order = np.random.default_rng(cfg.seed).permutation(len(source.refs))
    shards = [order[i:i + cfg.shard_size] for i in range(0, len(order), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not folder.done(k)]
    if len(todo) < len(shards):
        info(f"prepare: resuming, {len(shards) - len(todo)} of {len(shards)} shards already written")

    keys = sample_keys(source)
    workers = cfg.workers or os.cpu_count() or 1
    refs = [source.refs[i] for k in todo for i in shards[k]]
    results = _load_in_parallel(_loader(source, cfg), refs, workers, max_in_flight=cfg.shard_size + 64 * workers)
    with Progress(len(refs), "prepare", unit="img") as bar, closing(results):
        for k in todo:
            samples, rejected, class_counts = [], [], Counter()
            for i in shards[k]:
                result = next(results)
                bar.advance()
                ref, label = source.refs[i], source.labels[i]
                if "reason" in result:
                    rejected.append({"path": ref, "reason": result["reason"]})
                    continue
                meta = {"source": ref, "class": source.classes[label], "width": result["width"],
                        "height": result["height"]}
                samples.append((keys[i], {result["ext"]: result["data"], "cls": str(label).encode(),
                                          "json": json.dumps(meta).encode()}))
                class_counts[label] += 1
            _write_shard(folder, cfg.name, k, samples, rejected, class_counts)
        rate = bar.rate()
    manifest = _finish(folder, cfg, source, len(shards))
    return PrepareResult(out, manifest["num_samples"], manifest["num_rejected"], len(manifest["shards"]), len(todo),
                         images_per_second=rate)


def _finish(folder: OutputFolder, cfg: PrepareConfig, source: Source, num_shards: int) -> dict:
    """Gather the per-shard records into rejected.jsonl and manifest.json (last)."""
    records = folder.records(num_shards)
    class_counts = [0] * len(source.classes)
    for record in records:
        for label, count in record["class_counts"].items():
            class_counts[int(label)] += count
    rejected = sorted(source.rejected + [r for record in records for r in record["rejected"]], key=lambda r: r["path"])
    write_text(folder.root / REJECTED, "".join(json.dumps(r) + "\n" for r in rejected))
    if not any(r["samples"] for r in records):  # never a "complete" empty output
        folder.forget_pieces()  # once the source is fixed (e.g. `git lfs pull`), the same command reads it again
        reasons = Counter(r["reason"] for r in rejected).most_common(1)
        raise UserError(f"prepare: every one of the {len(rejected)} files was rejected, so no shard was written; "
                        f"see {folder.root / REJECTED} for each file's reason (most common: {reasons[0][0]}); "
                        "fix the source and run the same command again" if reasons else "prepare: no image to write")
    return folder.finish({
        "format": FORMAT,
        "version": 1,
        "created_by": f"d2ctool {__version__}",
        "source": {"kind": source.kind, "path": source.root},
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
        "classes": source.classes,
        "class_counts": class_counts,
        "num_samples": sum(r["samples"] for r in records),
        "num_rejected": len(rejected),
        "shards": [{"file": r["file"], "samples": r["samples"], "sha256": r["sha256"], "bytes": r["bytes"]}
                   for r in records if r["samples"]],
    })

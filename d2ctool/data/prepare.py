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
import shutil
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
from d2ctool.data.shards import MANIFEST, REJECTED, RESOLVED_CONFIG, shard_name, write_tar
from d2ctool.data.sources import SYNTHETIC, Source, scan_source
from d2ctool.data.verify import load_file, load_synthetic
from d2ctool.errors import UserError
from d2ctool.io import TMP_SUFFIX, atomic_path, sha256_file, write_json, write_text
from d2ctool.progress import Progress, info

FORMAT = "d2c-image-shards"
STATE_DIR = ".d2c-prepare"


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


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _check_out(out: Path, plan: dict) -> bool:
    """Return True when OUT already holds this exact finished run; refuse any other non-empty OUT."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    previous = None
    if (out / MANIFEST).is_file():
        previous = json.loads((out / MANIFEST).read_text()).get("plan")
    elif (out / STATE_DIR / "plan.json").is_file():
        previous = json.loads((out / STATE_DIR / "plan.json").read_text())
    elif any(out.iterdir()):
        raise UserError(f"output {out} is not empty and was not made by `d2c prepare`; choose a new or empty folder")
    else:
        return False
    if previous != plan:
        diff = "; ".join(_differences(previous or {}, plan)) or "unknown"
        raise UserError(f"output {out} was made with different arguments ({diff}). "
                        "Use the same arguments to resume, or a new folder")
    return (out / MANIFEST).is_file()


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


def _shard_done(out: Path, name: str, index: int) -> bool:
    record = out / STATE_DIR / f"{index:06d}.json"
    if not record.is_file():
        return False
    return json.loads(record.read_text())["samples"] == 0 or (out / shard_name(name, index)).is_file()


def _write_shard(out: Path, name: str, index: int, samples: list, rejected: list, class_counts: Counter) -> None:
    record = {"file": shard_name(name, index), "samples": len(samples), "rejected": rejected,
              "class_counts": {str(k): v for k, v in sorted(class_counts.items())}}
    if not samples:  # every file of this shard was rejected: no tar
        write_json(out / STATE_DIR / f"{index:06d}.json", record)
        return
    with atomic_path(out / record["file"]) as tmp:
        write_tar(tmp, samples)
        record.update(sha256=sha256_file(tmp), bytes=tmp.stat().st_size)
        write_json(out / STATE_DIR / f"{index:06d}.json", record)  # before the rename: tar present => record present


def prepare(src: str, out: str | Path, cfg: PrepareConfig, resolved_config: str) -> PrepareResult:
    source = scan_source(src, cfg)
    out = Path(out)
    plan = _plan(cfg, source)
    if _check_out(out, plan):
        manifest = json.loads((out / MANIFEST).read_text())
        return PrepareResult(out, manifest["num_samples"], manifest["num_rejected"], len(manifest["shards"]), 0,
                             already_complete=True)

    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".*{TMP_SUFFIX}"):  # temporaries of a killed run
        stale.unlink()
    write_json(out / STATE_DIR / "plan.json", plan)
    write_text(out / RESOLVED_CONFIG, resolved_config)

    order = np.random.default_rng(cfg.seed).permutation(len(source.refs))
    shards = [order[i:i + cfg.shard_size] for i in range(0, len(order), cfg.shard_size)]
    todo = [k for k in range(len(shards)) if not _shard_done(out, cfg.name, k)]
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
            _write_shard(out, cfg.name, k, samples, rejected, class_counts)
        rate = bar.rate()
    manifest = _finish(out, cfg, source, plan, len(shards))
    return PrepareResult(out, manifest["num_samples"], manifest["num_rejected"], len(manifest["shards"]), len(todo),
                         images_per_second=rate)


def _finish(out: Path, cfg: PrepareConfig, source: Source, plan: dict, num_shards: int) -> dict:
    """Gather the per-shard records into rejected.jsonl and manifest.json (last), then drop the state."""
    records = [json.loads((out / STATE_DIR / f"{k:06d}.json").read_text()) for k in range(num_shards)]
    class_counts = [0] * len(source.classes)
    for record in records:
        for label, count in record["class_counts"].items():
            class_counts[int(label)] += count
    rejected = sorted(source.rejected + [r for record in records for r in record["rejected"]], key=lambda r: r["path"])
    write_text(out / REJECTED, "".join(json.dumps(r) + "\n" for r in rejected))
    manifest = {
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
        "plan": plan,
    }
    write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / STATE_DIR)
    return manifest

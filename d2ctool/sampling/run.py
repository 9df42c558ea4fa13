"""`d2c sample OUT`: run the chain over all labels, write PNGs, then pack the ADM npz and a grid.

Batch k holds images [k*B, (k+1)*B) and draws from a generator seeded by (seed, k*B), so an image
depends only on its batch, never on how many times the run was resumed or how many ranks ran it
(given the same per-process thread count: float reductions depend on it). Under torchrun, rank r
makes batches r, r+W, ...; a batch counts as done once all its PNGs are written; rank 0 packs
`samples.npz` (arr_0 uint8 NHWC + labels, streamed to disk), `grid.png` and `manifest.json`.
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from d2ctool import distributed
from d2ctool.config import to_dict
from d2ctool.io import atomic_path, write_bytes
from d2ctool.progress import Progress, info
from d2ctool.runstate import OutputFolder
from d2ctool.sampling.chain import build_chain, generate_batch, make_labels
from d2ctool.sampling.config import SampleConfig
from d2ctool.stopping import StopSignals
from d2ctool.tokenizers.config import TokenizersConfig
from d2ctool.visual import save_grid

FORMAT = "d2c-samples"


@dataclass
class SampleResult:
    out: Path
    num_images: int
    generated: int  # by this run
    already_complete: bool = False
    images_per_second: float = 0.0
    timings: dict | None = None


def image_path(out: Path, index: int) -> Path:
    return out / "images" / f"{index:06d}.png"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pack_npz(out: Path, count: int, labels: np.ndarray) -> None:
    """samples.npz with arr_0 [N, H, W, 3] uint8 and labels, streamed from the PNGs (no N-image array in memory).

    Zip members get a fixed timestamp so the same images always give the same bytes.
    """
    first = np.asarray(Image.open(image_path(out, 0)).convert("RGB"))
    with atomic_path(out / "samples.npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, shape, dtype, rows in (
                ("arr_0.npy", (count, *first.shape), np.uint8,
                 (np.asarray(Image.open(image_path(out, i)).convert("RGB")) for i in range(count))),
                ("labels.npy", (count,), np.int64, iter([labels.astype(np.int64)]))):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                          "fortran_order": False, "shape": shape})
            entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(entry, "w", force_zip64=True) as f:
                f.write(header.getvalue())
                for row in rows:
                    f.write(np.ascontiguousarray(row, dtype=dtype).tobytes())


def write_grid(out: Path, labels: np.ndarray, cfg: SampleConfig) -> None:
    """grid.png: the first `grid_classes` classes in label order, `grid_per_class` samples each."""
    rows, names = [], []
    for cls in dict.fromkeys(labels.tolist()):
        indices = np.flatnonzero(labels == cls)[: cfg.grid_per_class]
        if len(indices) < cfg.grid_per_class and rows:
            continue
        images = [np.asarray(Image.open(image_path(out, int(i))).convert("RGB")) for i in indices]
        images += [np.full_like(images[0], 255)] * (cfg.grid_per_class - len(images))
        rows.append(np.stack(images))
        names.append(f"class {cls}")
        if len(rows) == cfg.grid_classes:
            break
    save_grid(out / "grid.png", np.concatenate(rows), cfg.grid_per_class, names)


def chain_inputs(chain) -> dict:
    """The content identity of everything the chain read: models, tokenizers and real images' shards."""
    return {name: {"path": record.get("checkpoint") or record.get("path"), "sha256": record["sha256"]}
            for name, record in chain.loaded.items() if "sha256" in record}


def sample(cfg: SampleConfig, tokenizers: TokenizersConfig, out: str | Path, resolved_config: str,
           force_restart: bool = False) -> SampleResult:
    out = Path(out)
    rank, world, device = distributed.init(cfg.device)
    chain = build_chain(cfg, tokenizers, device)
    labels = make_labels(cfg, chain.num_classes, chain)
    settings = to_dict(cfg)
    for irrelevant in ("device", "grid_classes", "grid_per_class"):
        settings.pop(irrelevant)
    plan = {"sample": settings, "inputs": chain_inputs(chain),
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    folder = OutputFolder(out, "sample", plan, force_restart)
    complete = folder.check()
    distributed.barrier()
    if complete:
        return SampleResult(out, len(labels), 0, already_complete=True)
    if rank == 0:
        folder.start(resolved_config)
        (out / "images").mkdir(exist_ok=True)
    distributed.barrier()

    starts = list(range(0, len(labels), cfg.batch_size))
    mine = [k for k in range(rank, len(starts), world) if not folder.done(k)]
    if rank == 0 and len(mine) * world < len(starts):
        info(f"sample: resuming, {sum(folder.done(k) for k in range(len(starts)))} of {len(starts)} batches done")
    timings: dict = {}
    total = sum(min(cfg.batch_size, len(labels) - starts[k]) for k in mine)
    begin = time.perf_counter()
    with StopSignals() as stop, Progress(total, "sample", unit="img", enabled=None if rank == 0 else False) as bar:
        # every rank asks at each batch boundary, as many times as the busiest rank has batches: a signal that
        # reaches one rank stops them all there, instead of leaving the others waiting at the next barrier
        for done in range(distributed.most_over_ranks(len(mine), device)):
            if stop.requested(world, device):  # every finished batch is kept
                raise stop.stop(f"sample kept {min(done, len(mine))} finished batch(es) of this run in {out} "
                                f"({max(len(mine) - done, 0)} left on this rank); run the same command again to resume")
            if done >= len(mine):
                continue
            k = mine[done]
            start = starts[k]
            batch_labels = labels[start:start + cfg.batch_size]
            pixels = generate_batch(chain, batch_labels, start, timings)
            for offset, image in enumerate(pixels):
                write_bytes(image_path(out, start + offset), _png(image))
            folder.write_record(k, {"file": None, "start": start, "count": len(batch_labels)})
            bar.advance(len(batch_labels))
    elapsed = time.perf_counter() - begin
    distributed.barrier()
    if rank == 0:
        pack_npz(out, len(labels), labels)
        write_grid(out, labels, cfg)
        folder.finish({"format": FORMAT, "version": 1, "mode": cfg.mode, "num_images": int(len(labels)),
                       "class_balanced": not cfg.classes and chain.oracle is None, "loaded": chain.loaded,
                       "images_per_second": round(total / elapsed, 3) if elapsed > 0 and total else None,
                       "files": {"images": "images/%06d.png", "npz": "samples.npz", "grid": "grid.png"}})
    distributed.barrier()
    return SampleResult(out, len(labels), total, images_per_second=total / elapsed if elapsed > 0 else 0.0,
                        timings=timings)

"""`d2c encode`: image shards -> shards of VQ codes and KL posterior moments of several views of each image.

Each input shard becomes one output shard of the same name holding, per image, `codes.npy`
(int16/int32 [V, h*w], row-major) and `moments.npy` (float16/32 [V, 2C, h, w]: mean, log-variance) of
the V views `encode.views` names (data/encoded.py VIEWS: the ADM-cropped image and its horizontal flip,
or LlamaGen's ten crops), plus `cls` and the source `json`.
Shards are written to a temporary name and renamed; a re-run skips finished shards. Under torchrun,
rank r encodes shards r, r+W, ...; rank 0 writes the manifest once all are done.

The manifest's `latent_norm` is how stage 2 will normalise the latents (tokenizers/latent_norm.py):
the KL tokenizer's scale factor, or per-channel statistics, read from `encode.latent_stats` or, when
none is given, computed by rank 0 after the last shard from posterior samples of the stored moments of
up to `encode.stats_images` randomly chosen images (LightningDiT's rule) and also written as
`latents_stats.pt` in LightningDiT's layout.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2ctool import __version__, distributed
from d2ctool.config import to_dict
from d2ctool.data.reader import decode_image, image_member
from d2ctool.data.members import SampleCheck
from d2ctool.data.encoded import FORMAT, VIEWS, main_view
from d2ctool.data.shards import iter_tar, load_manifest, npy_bytes, read_npy, read_shard, write_tar
from d2ctool.data.transforms import adm_center_crop, ten_crop
from d2ctool.checks import require_finite
from d2ctool.errors import UserError
from d2ctool.identity import file_input, shard_input
from d2ctool.io import atomic_path, sha256_file
from d2ctool.progress import Progress, info
from d2ctool.runstate import OutputFolder
from d2ctool.stopping import StopSignals
from d2ctool.tokenizers.config import EncodeConfig, TokenizersConfig
from d2ctool.tokenizers.kl import posterior_latents
from d2ctool.tokenizers.latent_norm import LatentNorm, channel_stats, load_stats, save_stats
from d2ctool.tokenizers.load import load_tokenizer



@dataclass
class EncodeResult:
    out: Path
    num_samples: int
    shards_written: int
    already_complete: bool = False
    images_per_second: float = 0.0


def token_grid(resolution: int, stride: int, name: str) -> int:
    if resolution % stride:
        raise UserError(f"encode.resolution {resolution} is not a multiple of {name}'s stride {stride}")
    return resolution // stride


def check_grids(resolution: int, vq, kl, vq_name: str, kl_name: str) -> int:
    """Both tokenizers must give the same token grid: stage 2 aligns the two grids position by position."""
    vq_grid, kl_grid = token_grid(resolution, vq.stride, vq_name), token_grid(resolution, kl.stride, kl_name)
    if vq_grid != kl_grid:
        raise UserError(f"the tokenizers' token grids differ at {resolution} px: {vq_name} (stride {vq.stride}) gives "
                        f"{vq_grid}x{vq_grid}, {kl_name} (stride {kl.stride}) gives {kl_grid}x{kl_grid}; "
                        "use tokenizers with the same stride")
    return vq_grid


def codes_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


@torch.no_grad()
def encode_images(vq, kl, views: np.ndarray, device: torch.device, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 views [N, V, R, R, 3] -> codes [N, V, h*w] (long) and moments [N, V, 2C, h, w] (float32), on the CPU."""
    n, v = views.shape[:2]
    x = torch.from_numpy(views).to(device).transpose(0, 1).flatten(0, 1)  # view-major: all first views, then ...
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        codes = vq.encode(x)
        moments = kl.encode_moments(x).float()
    codes = codes.reshape(v, n, -1).transpose(0, 1)
    moments = moments.reshape(v, n, *moments.shape[1:]).transpose(0, 1)
    return codes.cpu(), moments.cpu()


def crop_size(cfg: EncodeConfig) -> int:
    """The ADM centre crop the views are taken from: the resolution, or the larger crop of ten-crop."""
    return int(cfg.resolution * cfg.crop_range) if cfg.views == "ten-crop" else cfg.resolution


def image_views(crops: np.ndarray, cfg: EncodeConfig) -> np.ndarray:
    """uint8 ADM crops [N, S, S, 3] (S = `crop_size`) -> their views [N, V, R, R, 3], in data/encoded.py VIEWS
    order. Made per batch: a shard holds only its crops, not every view."""
    if cfg.views == "ten-crop":
        return np.stack([ten_crop(crop, cfg.resolution) for crop in crops])
    return np.stack([crops, crops[:, :, ::-1]], axis=1)


def encoded_channel_stats(out: Path, shards: list[dict], count: int, seed: int, view: int = 0) -> LatentNorm:
    """Per-channel mean / unbiased std of posterior samples (of `view`, the image itself) of `count` random
    encoded images."""
    total = sum(s["samples"] for s in shards)
    n = min(count, total)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(total, dtype=bool)
    chosen[rng.choice(total, n, replace=False)] = True
    noise_rng = np.random.default_rng([seed, 1])

    def batches():
        start, batch = 0, []
        for shard in shards:
            picked = chosen[start:start + shard["samples"]]
            if picked.any():
                for (_, members), take in zip(iter_tar(out / shard["file"]), picked):
                    if take:
                        batch.append(read_npy(members["moments.npy"])[view].astype(np.float32))
                    if len(batch) == 256:
                        yield _sample(np.stack(batch), noise_rng)
                        batch = []
            start += shard["samples"]
        if batch:
            yield _sample(np.stack(batch), noise_rng)

    mean, std, _ = channel_stats(batches())
    return LatentNorm.per_channel(mean, std, f"computed by d2c encode: posterior samples of {n} random images "
                                             f"(original views), seed {seed}")


def _sample(moments: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    n, c2, h, w = moments.shape
    noise = torch.from_numpy(rng.standard_normal((n, c2 // 2, h, w), dtype=np.float32))
    return posterior_latents(torch.from_numpy(moments), noise)


def _load_crop(data: bytes, size: int, where: str) -> np.ndarray:
    return np.asarray(adm_center_crop(decode_image(data, where), size))


def encode(shards: str | Path, out: str | Path, tokenizers: TokenizersConfig, cfg: EncodeConfig,
           resolved_config: str, force_restart: bool = False) -> EncodeResult:
    shards, out = Path(shards), Path(out)
    source = load_manifest(shards)
    check = SampleCheck(source, shards)
    vq, vq_info = load_tokenizer("vq", tokenizers.vq.preset, tokenizers.vq.checkpoint)
    kl, kl_info = load_tokenizer("kl", tokenizers.kl.preset, tokenizers.kl.checkpoint)
    grid = check_grids(cfg.resolution, vq, kl, vq_info.name, kl_info.name)
    norm_kind = kl.cfg.latent_norm if cfg.latent_norm == "auto" else cfg.latent_norm
    norm = None
    if norm_kind == "scale":
        if cfg.latent_stats:
            raise UserError(f"encode.latent_stats is set, but the latent normalisation is 'scale' ({kl_info.name}'s "
                            "default or encode.latent_norm): set encode.latent_norm=channel to use the statistics")
        norm = LatentNorm.scalar(kl.cfg.scale_factor, f"scale_factor of the KL tokenizer {kl_info.name}")
    elif cfg.latent_stats:
        norm = load_stats(cfg.latent_stats, kl.cfg.embed_dim)
    settings = to_dict(cfg)
    for irrelevant in ("batch_size", "loader_threads", "device"):  # do not change what is written
        settings.pop(irrelevant)
    if cfg.views == "flip":  # recorded only when they matter, so folders encoded before they existed still resume
        del settings["views"], settings["crop_range"]
    inputs = {"shards": shard_input(shards), "vq": {"path": vq_info.checkpoint, "sha256": vq_info.sha256},
              "kl": {"path": kl_info.checkpoint, "sha256": kl_info.sha256}}
    if cfg.latent_stats:
        inputs["latent_stats"] = file_input(cfg.latent_stats)
    plan = {"inputs": inputs, "encode": settings, "latent_norm": norm.record() if norm else "computed"}
    folder = OutputFolder(out, "encode", plan, force_restart)
    rank, world, device = distributed.init(cfg.device)
    complete = folder.check()
    distributed.barrier()  # every rank has looked before rank 0 writes anything
    if complete:
        return EncodeResult(out, json.loads((out / "manifest.json").read_text())["num_samples"], 0, True)
    if rank == 0:
        folder.start(resolved_config)
    distributed.barrier()

    vq, kl = vq.to(device), kl.to(device)
    view_names = VIEWS[cfg.views]
    autocast = device.type == "cuda" and cfg.precision == "bf16"
    code_type, moment_type = codes_dtype(vq.cfg.codebook_size), np.dtype(cfg.moments_dtype)
    num_shards = len(source["shards"])
    done = [i for i in range(num_shards) if folder.done(i)]
    if rank == 0 and done:
        info(f"encode: resuming, {len(done)} of {num_shards} shards already encoded")
    mine = [i for i in range(rank, num_shards, world) if i not in set(done)]
    total = sum(source["shards"][i]["samples"] for i in mine)
    if world > 1:
        info(f"encode: rank {rank} of {world} encodes {len(mine)} shard(s)")
    with StopSignals() as stop, Progress(total, "encode", unit="img", enabled=None if rank == 0 else False) as bar, \
            ThreadPoolExecutor(cfg.loader_threads) as pool:
        # every rank asks at each shard boundary, as often as the busiest rank has shards (see sampling/run.py)
        for finished in range(distributed.most_over_ranks(len(mine), device)):
            if stop.requested(world, device):  # every finished shard is kept
                raise stop.stop(f"encode kept {min(finished, len(mine))} finished shard(s) of this run in {out} "
                                f"({max(len(mine) - finished, 0)} left on this rank); run the same command again "
                                "to resume")
            if finished >= len(mine):
                continue
            entry = source["shards"][mine[finished]]
            samples = read_shard(shards, entry, source)  # size, sha256 and count verified on this first read
            for key, members in samples:
                check(shards / entry["file"], key, members)
            crops = list(pool.map(lambda s: _load_crop(image_member(s[1]), crop_size(cfg),
                                                       f"shard {shards / entry['file']}, sample {s[0]!r}"), samples))
            written = []
            for start in range(0, len(samples), cfg.batch_size):
                batch = image_views(np.stack(crops[start:start + cfg.batch_size]), cfg)
                codes, moments = encode_images(vq, kl, batch, device, autocast)
                with np.errstate(over="ignore"):  # float16 overflows to inf above 65504: checked just below
                    moments = moments.numpy().astype(moment_type)
                moments = require_finite(
                    moments, f"encode: the KL moments of {shards / entry['file']} "
                    f"(images {start}..{start + len(codes) - 1}, as {moment_type.name})",
                    f"the KL tokenizer {kl_info.checkpoint} gives non-finite latents"
                    + (" or values float16 cannot hold: set encode.moments_dtype=float32" if moment_type.itemsize < 4 else ""))
                for (key, members), c, m in zip(samples[start:start + cfg.batch_size], codes.numpy(), moments):
                    written.append((key, {"codes.npy": npy_bytes(c.astype(code_type)), "moments.npy": npy_bytes(m),
                                          "cls": members["cls"], "json": members.get("json", b"{}")}))
                bar.advance(len(codes))
            with atomic_path(out / entry["file"]) as tmp:
                write_tar(tmp, written)
                folder.write_record(mine[finished], {"file": entry["file"], "samples": len(written),
                                            "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size})
        rate = bar.rate()
    distributed.barrier()
    if rank == 0:
        records = folder.records(num_shards)
        if norm is None:
            info(f"encode: per-channel latent statistics from up to {cfg.stats_images} images")
            norm = encoded_channel_stats(out, records, cfg.stats_images, cfg.seed, main_view(view_names))
            save_stats(out / "latents_stats.pt", norm)
        folder.finish({
            "format": FORMAT,
            "version": 1,
            "created_by": f"d2ctool {__version__}",
            "source": {"path": inputs["shards"]["path"], "manifest_sha256": inputs["shards"]["sha256"]},
            "classes": source["classes"],
            "class_counts": source["class_counts"],
            "num_samples": sum(r["samples"] for r in records),
            "shards": [{k: r[k] for k in ("file", "samples", "sha256", "bytes")} for r in records],
            "resolution": cfg.resolution,
            "grid": [grid, grid],
            "codes": {"dtype": code_type.name, "shape": [len(view_names), grid * grid], "order": list(view_names)},
            "moments": {"dtype": moment_type.name, "shape": [len(view_names), 2 * kl.cfg.embed_dim, grid, grid],
                        "layout": "mean then log-variance on channels"},
            "latent_norm": norm.record(),
            "scale_factor": norm.scale if norm.kind == "scale" else None,
            "tokenizers": {
                "vq": {**vq_info.record(), "architecture": vq.architecture, "codebook_size": vq.cfg.codebook_size,
                       "codebook_dim": vq.cfg.codebook_dim, "stride": vq.stride, "grid": [grid, grid]},
                "kl": {**kl_info.record(), "architecture": kl.architecture, "latent_channels": kl.cfg.embed_dim,
                       "stride": kl.stride, "grid": [grid, grid], "scale_factor": kl.cfg.scale_factor},
            },
            "precision": "bf16" if autocast else "fp32",
        })
    distributed.barrier()
    num_samples = json.loads((out / "manifest.json").read_text())["num_samples"]
    return EncodeResult(out, num_samples, len(mine), images_per_second=rate)

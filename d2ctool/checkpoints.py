"""Loading checkpoints safely: official containers and our own, strict key checks with clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from d2ctool.checks import count_non_finite
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


def check_state_dict(state_dict, source: str | Path, what: str = "state dict", finite: bool = True) -> dict:
    """A state dict as loading needs it: text keys, tensor values, no NaN or infinite weights (a model with them
    runs, and writes black images or NaN metrics). Anything else is a UserError naming the file."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserError(f"{source}: its {what} is not a non-empty mapping of parameter names to tensors "
                        f"(got {type(state_dict).__name__}); is it a checkpoint of this kind?")
    odd_keys = [repr(k) for k in state_dict if not isinstance(k, str)]
    if odd_keys:
        raise UserError(f"{source}: its {what} has {len(odd_keys)} key(s) that are not parameter names (text): "
                        f"{listing(odd_keys)}; re-save it with torch.save({{'model': model.state_dict()}})")
    odd_values = [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if odd_values:
        raise UserError(f"{source}: its {what} has {len(odd_values)} entr(y/ies) that are not tensors: "
                        f"{listing(odd_values)}; is it a checkpoint of this kind?")
    non_finite = [k for k, v in state_dict.items() if finite and count_non_finite(v)]
    if non_finite:
        raise UserError(f"{source}: {len(non_finite)} tensor(s) of its {what} hold NaN or infinite values: "
                        f"{listing(non_finite)}; the file is damaged or was saved from a diverged run: use an "
                        "earlier checkpoint")
    return state_dict


def state_dict_entry(obj: dict, key: str, source: str | Path, finite: bool = False) -> dict:
    """`obj[key]` of a checkpoint container, checked to be a state dict (missing or wrong: a UserError); its
    values are checked for finiteness where they are loaded (`load_strict`), or here with `finite`."""
    if key not in obj:
        raise UserError(f"{source}: the checkpoint has no '{key}' entry (found: {listing(sorted(map(str, obj)), 8)})")
    return check_state_dict(obj[key], source, f"'{key}' entry", finite)


def weights_entry(obj: dict, use_ema: bool, ema_key: str = "ema", raw_key: str = "model") -> str:
    """Which entry of one of our containers to load: the EMA weights when asked for and saved, else the raw ones."""
    ema = obj.get(ema_key)
    return ema_key if use_ema and ema is not None and not (isinstance(ema, dict) and not ema) else raw_key


def refuse_other_format(obj: dict, accepted: tuple[str, ...], source: str | Path, what: str) -> None:
    """A file of another d2c format (a tokenizer given as a model, ...) is named as such, not read as an official one."""
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("d2c-") and fmt not in accepted:
        task = f" (`d2c {obj['task']}`)" if isinstance(obj.get("task"), str) else ""
        raise UserError(f"{source} is a '{fmt}' file{task}, not {what}: check which file the setting names")


def mapping_entry(obj: dict, key: str, source: str | Path) -> dict:
    """`obj[key]` of a checkpoint container that must be a mapping (a model config, a run's settings)."""
    value = obj.get(key)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        found = "missing" if key not in obj else f"a {type(value).__name__}"
        raise UserError(f"{source}: the checkpoint's '{key}' entry must be a mapping of names to values, but is "
                        f"{found}; the file is damaged or not a checkpoint of this kind")
    return value


def strip_wrappers(state_dict: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def unwrap(obj: dict, prefer: tuple[str, ...], path: str | Path) -> tuple[dict, str]:
    """The state dict inside a container: the first of `prefer` present, else a raw state dict."""
    for key in prefer:
        if isinstance(obj.get(key), dict):
            return strip_wrappers(check_state_dict(obj[key], path, f"'{key}' entry", finite=False)), key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return strip_wrappers(check_state_dict(obj, path, finite=False)), "(raw state dict)"
    raise UserError(f"{path}: no state dict found; expected one of the keys {', '.join(prefer)} "
                    f"(found: {listing(sorted(map(str, obj)), 8)})")


def listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_strict(module: torch.nn.Module, state_dict: dict, source: str, what: str) -> None:
    """Load every key exactly; otherwise a UserError listing missing, unexpected and mis-shaped keys."""
    check_state_dict(state_dict, source)
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

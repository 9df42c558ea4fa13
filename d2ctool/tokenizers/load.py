"""Build tokenizers from presets and load checkpoints: official containers or our own format.

Each kind has architectures (VQ: LlamaGen's VQ and the MaskGIT VQGAN; KL: LDM's AutoencoderKL); a
preset names a config of one of them and our own checkpoints record which. Official KL files of
VA-VAE are Lightning training checkpoints: `{'state_dict': ...}` that also hold the loss, the DINOv2
foundation model and its projection. Those keys are dropped by name (and listed); everything else
loads strictly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from d2ctool.checkpoints import (LoadedWeights, load_file, load_strict, mapping_entry, refuse_other_format,
                                  state_dict_entry, unwrap, weights_entry)
from d2ctool.config import ConfigError, build
from d2ctool.errors import UserError
from d2ctool.identity import file_sha256
from d2ctool.io import atomic_path
from d2ctool.progress import info as log
from d2ctool.tokenizers import kl, maskgit, vq
from d2ctool.tokenizers.kl import AutoencoderKL, KLConfig
from d2ctool.tokenizers.maskgit import MaskGITConfig, MaskGITVQ
from d2ctool.tokenizers.vq import VQConfig, VQModel

# every family's sizes stand at the bottom of its model file
PRESETS = {"vq": {**vq.PRESETS, **maskgit.PRESETS}, "kl": kl.PRESETS}
# architecture name -> (kind, config class, model class); our own checkpoints record the name
ARCHITECTURES = {model.architecture: (kind, cfg, model) for kind, cfg, model in
                 (("vq", VQConfig, VQModel), ("vq", MaskGITConfig, MaskGITVQ), ("kl", KLConfig, AutoencoderKL))}
DEFAULT_ARCHITECTURE = {"vq": VQModel.architecture, "kl": AutoencoderKL.architecture}  # files saved before the field
# which entry of an official container holds the weights to use, in order of preference
OFFICIAL_KEYS = {"vq": ("ema", "model", "state_dict"), "kl": ("model", "state_dict")}
# key prefixes of training-only modules in official KL files (VA-VAE's Lightning checkpoint)
TRAINING_ONLY = {"vq": (), "kl": ("loss.", "foundation_model.", "linear_proj.")}
OWN_FORMAT = "d2c-tokenizer"
OFFICIAL_HINT = {"vq": "LlamaGen's vq_ds16_c2i.pt (preset vq-16) or maskgit-vqgan-imagenet-f16-256.bin (maskgit-f16)",
                 "kl": "MAR's kl16.ckpt (preset kl-16) or vavae-imagenet256-f16d32-dinov2.pt (vavae-f16d32)"}


def preset_config(kind: str, preset: str):
    try:
        return dataclasses.replace(PRESETS[kind][preset])
    except KeyError:
        raise UserError(f"unknown {kind} preset '{preset}'; choose one of {', '.join(PRESETS[kind])}") from None


def build_tokenizer(kind: str, cfg) -> torch.nn.Module:
    for arch_kind, cfg_class, model_class in ARCHITECTURES.values():
        if isinstance(cfg, cfg_class):
            assert arch_kind == kind, f"a {type(cfg).__name__} is a {arch_kind} config, not {kind}"
            return model_class(cfg)
    raise TypeError(f"no tokenizer architecture takes a {type(cfg).__name__}")


def tokenizer_from_preset(kind: str, preset: str) -> torch.nn.Module:
    """A freshly initialised tokenizer of `preset` ("vq" or "kl" `kind`)."""
    return build_tokenizer(kind, preset_config(kind, preset))


def drop_training_only(kind: str, state_dict: dict, expected: dict) -> tuple[dict, dict[str, int]]:
    """Remove keys of training-only modules (by prefix) that the model does not have; count them per prefix."""
    dropped: dict[str, int] = {}
    kept = {}
    for key, value in state_dict.items():
        prefix = next((p for p in TRAINING_ONLY[kind] if key.startswith(p)), None)
        if prefix is not None and key not in expected:
            dropped[prefix + "*"] = dropped.get(prefix + "*", 0) + 1
        else:
            kept[key] = value
    return kept, dropped


def save_tokenizer(path: str | Path, model: torch.nn.Module, kind: str, name: str = "custom", extra: dict | None = None):
    """Write a tokenizer in our own format: its architecture travels with the weights."""
    payload = {"format": OWN_FORMAT, "kind": kind, "architecture": model.architecture, "name": name,
               "config": dataclasses.asdict(model.cfg),
               "model": model.state_dict(), **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_tokenizer(kind: str, preset: str, checkpoint: str | None) -> tuple[torch.nn.Module, LoadedWeights]:
    """The tokenizer with its weights (CPU, eval mode) and a record of what was loaded."""
    if checkpoint is None:
        raise UserError(f"tokenizers.{kind}.checkpoint is not set: give {OFFICIAL_HINT[kind]} (preset given: "
                        f"{preset}) or a tokenizer trained with `d2c train-tokenizer {kind}`")
    obj = load_file(checkpoint)
    refuse_other_format(obj, (OWN_FORMAT,), checkpoint, f"a {kind} tokenizer")
    if obj.get("format") == OWN_FORMAT:
        if obj.get("kind") != kind:
            raise UserError(f"{checkpoint} is a {obj.get('kind')} tokenizer, but tokenizers.{kind} needs a {kind} one")
        architecture = obj.get("architecture", DEFAULT_ARCHITECTURE[kind])
        if not isinstance(architecture, str) or architecture not in ARCHITECTURES or ARCHITECTURES[architecture][0] != kind:
            raise UserError(f"{checkpoint}: unknown tokenizer architecture '{architecture}' (this d2ctool knows "
                            f"{', '.join(ARCHITECTURES)})")
        try:
            cfg = build(ARCHITECTURES[architecture][1], mapping_entry(obj, "config", checkpoint))
        except ConfigError as e:
            raise UserError(f"{checkpoint}: its tokenizer config is invalid ({e})") from None
        weights = weights_entry(obj, use_ema=True)
        name, state_dict = str(obj.get("name", "custom")), state_dict_entry(obj, weights, checkpoint)
    else:
        cfg = preset_config(kind, preset)
        name = preset
        state_dict, weights = unwrap(obj, OFFICIAL_KEYS[kind], checkpoint)
    model = build_tokenizer(kind, cfg)
    state_dict, dropped = drop_training_only(kind, state_dict, model.state_dict())
    if dropped:
        listed = ", ".join(f"{n} {p}" for p, n in dropped.items())
        weights += f" (dropped training-only keys: {listed})"
        log(f"{checkpoint}: dropped {sum(dropped.values())} training-only key(s) of {name}: {listed}")
    load_strict(model, state_dict, str(checkpoint), f"the {kind} tokenizer '{name}'")
    info = LoadedWeights(name, str(Path(checkpoint).resolve()), file_sha256(checkpoint), dataclasses.asdict(cfg),
                         weights, kind)
    return model.eval(), info

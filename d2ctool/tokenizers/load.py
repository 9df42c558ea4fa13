"""Build tokenizers from presets and load checkpoints: official containers or our own format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from d2ctool.checkpoints import LoadedWeights, load_file, load_strict, unwrap
from d2ctool.config import ConfigError, build
from d2ctool.errors import UserError
from d2ctool.io import atomic_path, sha256_file
from d2ctool.tokenizers.kl import AutoencoderKL, KLConfig
from d2ctool.tokenizers.vq import VQConfig, VQModel

PRESETS = {
    "vq": {
        "vq-16": VQConfig(),  # LlamaGen VQ_16
        "vq-8": VQConfig(ch_mult=[1, 2, 2, 4]),  # LlamaGen VQ_8
        "vq-tiny-s4": VQConfig(codebook_size=512, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=32,
                               usage_window=4096),
        "vq-tiny-s8": VQConfig(codebook_size=512, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=32,
                               usage_window=4096),
    },
    "kl": {
        "kl-16": KLConfig(),  # MAR kl16
        "kl-tiny-s4": KLConfig(embed_dim=4, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, encoder_attn_levels=[2],
                               scale_factor=1.0),
        "kl-tiny-s8": KLConfig(embed_dim=4, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, encoder_attn_levels=[3],
                               scale_factor=1.0),
    },
}
CONFIGS = {"vq": VQConfig, "kl": KLConfig}
MODELS = {"vq": VQModel, "kl": AutoencoderKL}
# which entry of an official container holds the weights to use, in order of preference
OFFICIAL_KEYS = {"vq": ("ema", "model", "state_dict"), "kl": ("model", "state_dict")}
OWN_FORMAT = "d2c-tokenizer"


def preset_config(kind: str, preset: str):
    try:
        return dataclasses.replace(PRESETS[kind][preset])
    except KeyError:
        raise UserError(f"unknown {kind} preset '{preset}'; choose one of {', '.join(PRESETS[kind])}") from None


def build_tokenizer(kind: str, cfg) -> torch.nn.Module:
    return MODELS[kind](cfg)


def save_tokenizer(path: str | Path, model: torch.nn.Module, kind: str, name: str = "custom", extra: dict | None = None):
    """Write a tokenizer in our own format: its architecture travels with the weights."""
    payload = {"format": OWN_FORMAT, "kind": kind, "name": name, "config": dataclasses.asdict(model.cfg),
               "model": model.state_dict(), **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_tokenizer(kind: str, preset: str, checkpoint: str | None) -> tuple[torch.nn.Module, LoadedWeights]:
    """The tokenizer with its weights (CPU, eval mode) and a record of what was loaded."""
    if checkpoint is None:
        hint = {"vq": "LlamaGen's vq_ds16_c2i.pt", "kl": "MAR's kl16.ckpt"}[kind]
        raise UserError(f"tokenizers.{kind}.checkpoint is not set: give {hint} (with preset {preset}) or a "
                        f"tokenizer trained with `d2c train-tokenizer {kind}`")
    obj = load_file(checkpoint)
    if obj.get("format") == OWN_FORMAT:
        if obj.get("kind") != kind:
            raise UserError(f"{checkpoint} is a {obj.get('kind')} tokenizer, but tokenizers.{kind} needs a {kind} one")
        try:
            cfg = build(CONFIGS[kind], obj["config"])
        except ConfigError as e:
            raise UserError(f"{checkpoint}: its tokenizer config is invalid ({e})") from None
        name, state_dict, weights = obj.get("name", "custom"), obj.get("ema") or obj["model"], "ema" if obj.get("ema") else "model"
    else:
        cfg = preset_config(kind, preset)
        name = preset
        state_dict, weights = unwrap(obj, OFFICIAL_KEYS[kind], checkpoint)
    model = build_tokenizer(kind, cfg)
    load_strict(model, state_dict, str(checkpoint), f"the {kind} tokenizer '{name}'")
    info = LoadedWeights(name, str(Path(checkpoint).resolve()), sha256_file(checkpoint), dataclasses.asdict(cfg),
                         weights, kind)
    return model.eval(), info

"""Build stage-2 models from presets and load checkpoints: MAR's official ones and our own format.

MAR's released `mar_{base,large,huge}.pth` hold `{"model": ..., "model_ema": ...}`; the EMA weights
are the ones to sample with, so `model_ema` is preferred. Its training checkpoints add `optimizer`,
`epoch`, `scaler` and `args` (an argparse.Namespace, which `load_file` allows). A fused model can start
from any such checkpoint with `init_from_checkpoint`: the matching keys load, the fusion's are new.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from d2ctool.checkpoints import (CHECKPOINT_FORMAT, LoadedWeights, check_state_dict, listing, load_file, load_strict,
                                  mapping_entry, refuse_other_format, run_checkpoint, state_dict_entry, unwrap,
                                  weights_entry)
from d2ctool.config import ConfigError, build
from d2ctool.continuous.config import PRESETS, RETIRED_FIELDS, MARConfig
from d2ctool.continuous.model import MAR
from d2ctool.errors import UserError
from d2ctool.identity import file_sha256
from d2ctool.io import atomic_path

# which entry of an official container holds the weights, in order of preference
OFFICIAL_KEYS = ("model_ema", "model", "state_dict")
OWN_FORMAT = "d2c-mar"


def preset_config(preset: str, overrides: dict | None = None) -> MARConfig:
    """A preset's config with `overrides` (field -> value) applied, every value type- and bound-checked."""
    if preset not in PRESETS:
        raise UserError(f"unknown MAR preset '{preset}'; choose one of {', '.join(PRESETS)}")
    return config_from_dict({**dataclasses.asdict(PRESETS[preset]), **(overrides or {})}, f"preset {preset}")


def config_from_dict(data: dict, where: str) -> MARConfig:
    """The architecture config a checkpoint records; the sampling settings older ones kept there are dropped."""
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
    try:
        return build(MARConfig, data).validate()
    except ConfigError as e:
        raise UserError(f"{where}: invalid MAR config ({e})") from None


def build_mar(cfg: MARConfig) -> MAR:
    return MAR(cfg)


def mar_from_preset(preset: str, **data) -> MAR:
    """A freshly initialised MAR of `preset` for data of this shape (latent_channels, latent_size, code_vocab,
    code_size, num_classes; any other MARConfig field may be given too)."""
    return MAR(preset_config(preset, data))


def save_mar(path: str | Path, model: MAR, name: str = "custom", ema: dict | None = None, extra: dict | None = None):
    """Write a model in our own format: its config travels with the weights (and the EMA weights, if any)."""
    payload = {"format": OWN_FORMAT, "name": name, "config": dataclasses.asdict(model.cfg),
               "model": model.state_dict(), **({"model_ema": ema} if ema is not None else {}), **(extra or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _weights(obj: dict, checkpoint, use_ema: bool = True) -> tuple[dict, str]:
    """The EMA weights when asked and present, else the raw ones; with use_ema=False never the EMA."""
    if obj.get("format") == OWN_FORMAT:
        key = "model_ema" if use_ema and isinstance(obj.get("model_ema"), dict) else "model"
        return state_dict_entry(obj, key, checkpoint), key
    return unwrap(obj, OFFICIAL_KEYS if use_ema else tuple(k for k in OFFICIAL_KEYS if k != "model_ema"), checkpoint)


def load_mar(preset: str, checkpoint: str | Path | None, overrides: dict | None = None,
             use_ema: bool = True) -> tuple[MAR, LoadedWeights]:
    """The model with its weights (CPU, eval mode) and a record of what was loaded. Our own checkpoints
    carry their config (the preset is ignored); official ones are read with the preset's architecture.
    `overrides` change config fields that leave the state dict alone (e.g. grad_checkpointing)."""
    if checkpoint is None:
        raise UserError(f"no MAR checkpoint given: pass MAR's mar_base/large/huge.pth (with preset mar-b/l/h) or "
                        f"a checkpoint of our own (preset given: {preset})")
    checkpoint = run_checkpoint(checkpoint)
    obj = load_file(checkpoint)
    refuse_other_format(obj, (OWN_FORMAT, CHECKPOINT_FORMAT), checkpoint, "a stage-2 (MAR) model")
    trained_on = None
    if obj.get("format") == CHECKPOINT_FORMAT:  # a `d2c train-continuous` run
        if obj.get("task") != "train-continuous":
            raise UserError(f"{checkpoint} is a `d2c {obj.get('task')}` checkpoint, not a stage-2 (train-continuous) one")
        cfg = config_from_dict({**mapping_entry(obj, "model_config", checkpoint), **(overrides or {})}, str(checkpoint))
        name = "train-continuous"
        weights = weights_entry(obj, use_ema)
        state_dict = state_dict_entry(obj, weights, checkpoint)
        trained_on = mapping_entry(obj, "config", checkpoint).get("trained_on")
        if trained_on is not None and not (isinstance(trained_on, dict) and all(
                isinstance(trained_on.get(k), dict) for k in ("vq", "kl"))):
            raise UserError(f"{checkpoint}: its record of the training data (config.trained_on) is damaged; "
                            "use another checkpoint of the run")
    else:
        if obj.get("format") == OWN_FORMAT:
            cfg = config_from_dict({**mapping_entry(obj, "config", checkpoint), **(overrides or {})}, str(checkpoint))
            name = obj.get("name", "custom")
        else:
            cfg, name = preset_config(preset, overrides), preset
        state_dict, weights = _weights(obj, checkpoint, use_ema)
    model = build_mar(cfg)
    hint = (" (a fused model starts from a plain MAR checkpoint with init_from_checkpoint)"
            if cfg.fusion != "none" else "")
    load_strict(model, state_dict, str(checkpoint), f"the MAR model '{name}' (fusion {cfg.fusion}){hint}")
    info = LoadedWeights(name, str(Path(checkpoint).resolve()), file_sha256(checkpoint), dataclasses.asdict(cfg), weights,
                         trained_on=trained_on)
    return model.eval(), info


def init_from_checkpoint(model: MAR, checkpoint: str | Path) -> list[str]:
    """Load every key of a MAR checkpoint (official or ours) that `model` has, and return the model's keys
    the file did not provide (a fusion's new parameters), sorted. Keys of the file that the model lacks
    and shape mismatches are refused: the architectures must agree apart from the fusion."""
    obj = load_file(checkpoint)
    refuse_other_format(obj, (OWN_FORMAT, CHECKPOINT_FORMAT), checkpoint, "a MAR model to initialise from")
    state_dict, _ = _weights(obj, checkpoint)
    check_state_dict(state_dict, checkpoint)  # finite weights: this load is not strict, so not via load_strict
    expected = model.state_dict()
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = [f"{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in sorted(state_dict.items())
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if unexpected or mismatched:
        parts = [f"{checkpoint} cannot initialise this MAR model (fusion {model.cfg.fusion}):"]
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) the model lacks: {listing(unexpected)};")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {listing(mismatched)};")
        parts.append("use the preset of the checkpoint's architecture (widths, depths, latent size) and change "
                     "only the fusion")
        raise UserError(" ".join(parts))
    model.load_state_dict(state_dict, strict=False)
    return sorted(k for k in expected if k not in state_dict)

"""Stage-1 checkpoints: LlamaGen's released c2i models, RAR's released rar_*.bin, and our own training runs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path

from torch import nn

from d2ctool.checkpoints import (CHECKPOINT_FORMAT, load_file, load_strict, mapping_entry, refuse_other_format,
                                  run_checkpoint, state_dict_entry, unwrap, weights_entry)
from d2ctool.config import ConfigError, build
from d2ctool.discrete.config import GPTConfig, RARConfig, StageOneConfig, preset
from d2ctool.discrete.model import GPT
from d2ctool.discrete.rar import POSITION_ROWS_EXTRA, RAR
from d2ctool.errors import UserError
from d2ctool.identity import file_sha256

# LlamaGen's sampler reads "model", also a raw state dict, "module" or "state_dict"; rar_*.bin is a raw state dict
OFFICIAL_KEYS = ("model", "module", "state_dict")
FAMILIES = {"gpt": (GPTConfig, GPT), "rar": (RARConfig, RAR)}
FAMILY_KEYS = {"gpt": "tok_embeddings.weight", "rar": "target_aware_pos_embed"}  # a key only that family has


def family(cfg: StageOneConfig) -> str:
    return "rar" if isinstance(cfg, RARConfig) else "gpt"


def build_model(cfg: StageOneConfig) -> GPT | RAR:
    """The stage-1 model of a config (e.g. `build_model(data_config(preset("rar-b"), 1024, 16, 1000))`)."""
    cfg.check()
    return FAMILIES[family(cfg)][1](cfg)


def stage1_from_preset(name: str, vocab_size: int, grid: int, num_classes: int) -> GPT | RAR:
    """A freshly initialised stage-1 model of preset `name` (gpt-* or rar-*) for this vocabulary, token grid
    and number of classes."""
    return build_model(data_config(preset(name), vocab_size, grid, num_classes))


def model_record(cfg: StageOneConfig) -> dict:
    """The model config as stored in our checkpoints: its fields and its family."""
    return {"family": family(cfg), **dataclasses.asdict(cfg)}


def config_from_record(record: dict, source: str | Path = "a stage-1 checkpoint") -> StageOneConfig:
    record = dict(record)
    name = record.pop("family", "gpt")  # checkpoints written before RAR existed are GPTs
    if not isinstance(name, str) or name not in FAMILIES:
        raise UserError(f"{source}: a stage-1 model of unknown family {name!r} (known: {', '.join(FAMILIES)})")
    try:
        return build(FAMILIES[name][0], record)
    except ConfigError as e:
        raise UserError(f"{source}: its stage-1 model config is invalid ({e})") from None


def official_rar_shape(cfg: RARConfig, state_dict: dict, source: str) -> RARConfig:
    """A released RAR file carries its vocabulary, classes and token count in its tables: read them from there,
    so that a tokenizer mismatch is reported as such rather than as a wrong shape."""
    try:
        vocab = state_dict["lm_head.weight"].shape[0]
        rows = state_dict["embeddings.weight"].shape[0]
        tokens = state_dict["pos_embed"].shape[1] - POSITION_ROWS_EXTRA
    except (KeyError, IndexError):
        return cfg  # not a RAR state dict: load_strict names the missing keys
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens or rows - vocab - 2 < 1:
        raise UserError(f"{source}: not a RAR class-conditional checkpoint over a square token grid "
                        f"({tokens} positions, {rows} embedding rows for {vocab} codes)")
    return replace(cfg, vocab_size=vocab, num_classes=rows - vocab - 2, grid=grid)


def load_stage1(path: str | Path, cfg: StageOneConfig | None = None, use_ema: bool = True) -> tuple[nn.Module, dict]:
    """A GPT or RAR with weights from `path` (a run folder, our checkpoint, or an official c2i / rar file).

    Our checkpoints carry their model config; an official file needs `cfg` (preset + data shape; a RAR
    file's vocabulary, classes and grid are read from the file itself).
    """
    path = run_checkpoint(path)
    obj = load_file(path)
    refuse_other_format(obj, (CHECKPOINT_FORMAT,), path, "a stage-1 (discrete) model")
    if obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("task") != "train-discrete":
            raise UserError(f"{path} is a `d2c {obj.get('task')}` checkpoint, not a stage-1 (train-discrete) one")
        model_cfg = config_from_record(mapping_entry(obj, "model_config", path), path)
        if cfg is not None:
            check_compatible(model_cfg, cfg, str(path))
        weights = weights_entry(obj, use_ema)
        state_dict = state_dict_entry(obj, weights, path)
    else:
        if cfg is None:
            raise UserError(f"{path} is an official checkpoint: its model preset must be given")
        state_dict, weights = unwrap(obj, OFFICIAL_KEYS, path)
        held = next((name for name, key in FAMILY_KEYS.items() if key in state_dict), family(cfg))
        if held != family(cfg):
            raise UserError(f"{path} is a {held.upper()} checkpoint but the preset asked for is a "
                            f"{family(cfg).upper()} one: give a {held}-* preset (sample.discrete_preset)")
        model_cfg = official_rar_shape(cfg, state_dict, str(path)) if isinstance(cfg, RARConfig) else cfg
    model = build_model(model_cfg)
    load_strict(model, state_dict, str(path), f"the discrete (stage-1) {family(model_cfg).upper()} model")
    return model.eval(), {"checkpoint": str(Path(path).resolve()), "sha256": file_sha256(path), "weights": weights,
                          "step": obj.get("step")}


def check_compatible(model_cfg: StageOneConfig, wanted: StageOneConfig, source: str) -> None:
    """The stage-1 model must speak the VQ tokenizer's vocabulary on its grid, for the data's classes."""
    if family(model_cfg) != family(wanted):
        raise UserError(f"{source} holds a {family(model_cfg).upper()} model, but a {family(wanted).upper()} "
                        "preset was asked for")
    for name in ("vocab_size", "grid", "num_classes"):
        have, need = getattr(model_cfg, name), getattr(wanted, name)
        if have != need:
            raise UserError(f"{source}: the discrete model has {name} {have}, but the data/tokenizer need {need} "
                            "(a model trained for another tokenizer or data set)")


def data_config(preset_cfg: StageOneConfig, vocab_size: int, grid: int, num_classes: int) -> StageOneConfig:
    return replace(preset_cfg, vocab_size=vocab_size, grid=grid, num_classes=num_classes)

"""Stage-1 checkpoints: LlamaGen's released c2i models and our own training runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from d2ctool.checkpoints import load_file, load_strict, unwrap
from d2ctool.config import build
from d2ctool.discrete.config import GPTConfig
from d2ctool.discrete.model import GPT
from d2ctool.errors import UserError
from d2ctool.training.trainer import CHECKPOINT_FORMAT, run_checkpoint

# LlamaGen's sampler reads "model", also a raw state dict, "module" or "state_dict"
OFFICIAL_KEYS = ("model", "module", "state_dict")


def load_gpt(path: str | Path, cfg: GPTConfig | None = None, use_ema: bool = True) -> tuple[GPT, dict]:
    """A GPT with weights from `path` (a run folder, our checkpoint, or an official c2i file).

    Our checkpoints carry their model config; an official file needs `cfg` (preset + data shape).
    """
    path = run_checkpoint(path)
    obj = load_file(path)
    if obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("task") != "train-discrete":
            raise UserError(f"{path} is a `d2c {obj.get('task')}` checkpoint, not a stage-1 (train-discrete) one")
        model_cfg = build(GPTConfig, obj["model_config"])
        if cfg is not None:
            check_compatible(model_cfg, cfg, str(path))
        weights = "ema" if use_ema and obj.get("ema") else "model"
        state_dict = obj[weights]
    else:
        if cfg is None:
            raise UserError(f"{path} is an official checkpoint: its model preset must be given")
        model_cfg = cfg
        state_dict, weights = unwrap(obj, OFFICIAL_KEYS, path)
    model_cfg.check()
    model = GPT(model_cfg)
    load_strict(model, state_dict, str(path), "the discrete (stage-1) model")
    return model.eval(), {"checkpoint": str(path), "weights": weights, "step": obj.get("step")}


def check_compatible(model_cfg: GPTConfig, wanted: GPTConfig, source: str) -> None:
    """The stage-1 model must speak the VQ tokenizer's vocabulary on its grid, for the data's classes."""
    for name in ("vocab_size", "grid", "num_classes"):
        have, need = getattr(model_cfg, name), getattr(wanted, name)
        if have != need:
            raise UserError(f"{source}: the discrete model has {name} {have}, but the data/tokenizer need {need} "
                            "(a model trained for another tokenizer or data set)")


def data_config(preset_cfg: GPTConfig, vocab_size: int, grid: int, num_classes: int) -> GPTConfig:
    return replace(preset_cfg, vocab_size=vocab_size, grid=grid, num_classes=num_classes)

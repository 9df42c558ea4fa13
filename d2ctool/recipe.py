"""A recipe is one YAML file with a section per command; this module loads and validates it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from d2ctool.config import ConfigError, apply_overrides, build, nested, to_yaml
from d2ctool.continuous.config import ContinuousConfig
from d2ctool.data.config import PrepareConfig
from d2ctool.discrete.config import DiscreteConfig
from d2ctool.tokenizers.config import EncodeConfig, TokenizersConfig, TokenizerTrainingConfig
from d2ctool.errors import UserError
from d2ctool.evaluation.config import FidConfig
from d2ctool.sampling.config import SampleConfig


@dataclass
class Recipe:
    prepare: PrepareConfig = nested(PrepareConfig)
    tokenizers: TokenizersConfig = nested(TokenizersConfig)
    tokenizer_training: TokenizerTrainingConfig = nested(TokenizerTrainingConfig)
    encode: EncodeConfig = nested(EncodeConfig)
    discrete: DiscreteConfig = nested(DiscreteConfig)
    continuous: ContinuousConfig = nested(ContinuousConfig)
    sample: SampleConfig = nested(SampleConfig)
    fid: FidConfig = nested(FidConfig)


def load_recipe(path: str | Path | None, overrides: list[str] = (), section: str | None = None) -> Recipe:
    """Read a recipe (or the defaults when `path` is None), apply `--set` overrides, validate everything.

    `section` is the running command's section: overrides may name keys relative to it.
    """
    data: dict = {}
    where = None
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path} (see recipes/ for examples)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections (prepare:, fid:, ...), got {type(data).__name__}")
    data = apply_overrides(data, list(overrides), Recipe, section)
    try:
        recipe = build(Recipe, data)
        check_runtime_fields(recipe, section)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return recipe


def check_runtime_fields(recipe: Recipe, section: str | None) -> None:
    """What types cannot say, checked before any work: seeds are non-negative 63-bit integers everywhere; the
    running command's `device` names a device this machine has (fid's extractor checks its own)."""
    from d2ctool.distributed import check_device

    def walk(obj, prefix: str, devices: bool):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.", devices)
            elif (f.name == "seed" or f.name.endswith("_seed")) and isinstance(value, int) \
                    and not 0 <= value < 2 ** 63:
                raise ConfigError(f"{key}: a seed must be an integer in 0..2**63-1, got {value}")
            elif devices and f.name == "device" and value is not None:
                try:
                    check_device(value, key)
                except UserError as e:
                    raise ConfigError(str(e)) from None

    for name in (f.name for f in dataclasses.fields(recipe)):
        walk(getattr(recipe, name), f"{name}.", devices=name == section and name != "fid")


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe (file + overrides + defaults), as saved next to every output."""
    return to_yaml(recipe)

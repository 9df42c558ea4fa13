"""A recipe is one YAML file with a section per command; this module loads and validates it.

A recipe may open with a `paths:` block of named strings; any string value elsewhere may use them as
`${name}` (e.g. `data: ${root}/encoded`). `--set paths.root=/mnt/x` changes a path everywhere it is used.
The resolved recipe saved next to outputs holds the substituted values.
"""

from __future__ import annotations

from dataclasses import dataclass
import re
from pathlib import Path

import yaml

from d2ctool.config import ConfigError, apply_overrides, build, nested, to_yaml
from d2ctool.continuous.config import ContinuousConfig
from d2ctool.data.config import PrepareConfig
from d2ctool.discrete.config import DiscreteConfig
from d2ctool.tokenizers.config import EncodeConfig, TokenizersConfig, TokenizerTrainingConfig
from d2ctool.evaluation.config import FidConfig
from d2ctool.sampling.config import SampleConfig
from d2ctool.training.config import PlanConfig

PATHS = "paths"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
    plan: PlanConfig = nested(PlanConfig)


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
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections (prepare:, fid:, ...), got {type(data).__name__}")
    paths, overrides = _paths(data.pop(PATHS, None), list(overrides), where)
    data = _substitute(apply_overrides(data, overrides, Recipe, section), paths, where)
    try:
        return build(Recipe, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe (file + overrides + defaults), as saved next to every output."""
    return to_yaml(recipe)


def _paths(block, overrides: list[str], where: str | None) -> tuple[dict[str, str], list[str]]:
    """The `paths:` block with `--set paths.NAME=VALUE` applied, and the remaining overrides."""
    prefix = f"{where}: " if where else ""
    if block is None:
        block = {}
    if not isinstance(block, dict) or not all(isinstance(v, str) for v in block.values()):
        raise ConfigError(f"{prefix}{PATHS}: expected a mapping of names to path strings, got {block!r}")
    paths, rest = dict(block), []
    for text in overrides:
        key, sep, value = text.partition("=")
        if not key.strip().startswith(PATHS + "."):
            rest.append(text)
            continue
        name = key.strip()[len(PATHS) + 1:]
        if not sep or name not in paths:
            known = ", ".join(f"{PATHS}.{n}" for n in paths) or "none in this recipe"
            raise ConfigError(f"--set {text}: expected {PATHS}.NAME=VALUE with a name of the recipe's {PATHS} "
                              f"block ({known})")
        paths[name] = value
    for name, value in paths.items():
        if _REFERENCE.search(value):
            raise ConfigError(f"{prefix}{PATHS}.{name}: a path may not refer to another (${{...}}); write it out")
    return paths, rest


def _substitute(node, paths: dict[str, str], where: str | None, key: str = ""):
    """Replace `${name}` in every string of the recipe by paths[name]."""
    if isinstance(node, dict):
        return {k: _substitute(v, paths, where, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, paths, where, f"{key}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def lookup(match: re.Match) -> str:
        if match.group(1) not in paths:
            known = ", ".join(paths) or f"none: add a {PATHS}: block"
            raise ConfigError(f"{where + ': ' if where else ''}{key}: unknown path ${{{match.group(1)}}} "
                              f"(defined: {known})")
        return paths[match.group(1)]

    return _REFERENCE.sub(lookup, node)

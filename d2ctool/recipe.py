"""A recipe is one YAML file with a section per command; this module loads and validates it.

A recipe may open with a `paths:` block of named strings; any string value elsewhere may use them as
`${name}` (e.g. `data: ${root}/encoded`). `--set paths.root=/mnt/x` changes a path everywhere it is used.
The resolved recipe saved next to outputs holds the substituted values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import re
from pathlib import Path

import yaml

from d2ctool.config import ConfigError, apply_overrides, build, nested, to_yaml
from d2ctool.continuous.config import ContinuousConfig
from d2ctool.data.config import PrepareConfig
from d2ctool.discrete.config import DiscreteConfig
from d2ctool.tokenizers.config import EncodeConfig, TokenizersConfig, TokenizerTrainingConfig
from d2ctool.errors import UserError
from d2ctool.evaluation.config import FidConfig
from d2ctool.sampling.config import SampleConfig, SweepConfig
from d2ctool.training.config import PlanConfig

PATHS = "paths"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE = re.compile(r"\$\{(" + _NAME.pattern + r")\}")


@dataclass
class Recipe:
    prepare: PrepareConfig = nested(PrepareConfig)
    tokenizers: TokenizersConfig = nested(TokenizersConfig)
    tokenizer_training: TokenizerTrainingConfig = nested(TokenizerTrainingConfig)
    encode: EncodeConfig = nested(EncodeConfig)
    discrete: DiscreteConfig = nested(DiscreteConfig)
    continuous: ContinuousConfig = nested(ContinuousConfig)
    sample: SampleConfig = nested(SampleConfig)
    sweep: SweepConfig = nested(SweepConfig)
    fid: FidConfig = nested(FidConfig)
    plan: PlanConfig = nested(PlanConfig)


def packaged_recipes() -> dict[str, Path]:
    """The recipes shipped inside the package, by name ("tiny", "imagenet256/mar-b", ...)."""
    root = Path(__file__).parent / "recipes"
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """The first line of a recipe's opening comment."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def find_recipe(path: str | Path) -> Path:
    """A recipe file: the path itself when it is a file, else the shipped recipe of that name (`tiny`,
    `imagenet256/mar-b`, with or without `recipes/` and `.yaml`), so that recipes work from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml")
    name = name[len("recipes/"):] if name.startswith("recipes/") else name
    shipped = packaged_recipes()
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"recipe not found: {path} (neither a file nor a shipped recipe; `d2c recipes` lists "
                      f"those: {', '.join(shipped)})")


def load_recipe(path: str | Path | None, overrides: list[str] = (), section: str | None = None) -> Recipe:
    """Read a recipe (or the defaults when `path` is None), apply `--set` overrides, validate everything.

    `path` is a YAML file or a shipped recipe's name (see find_recipe). `section` is the running command's
    section: overrides may name keys relative to it.
    """
    data: dict = {}
    where = None
    if path is not None:
        where = str(path)
        path = find_recipe(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections (prepare:, fid:, ...), got {type(data).__name__}")
    paths, overrides = _paths(data.pop(PATHS, None), list(overrides), where)
    data = _substitute(apply_overrides(data, overrides, Recipe, section), paths, where)
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
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{prefix}{PATHS}: the name {name!r} is not an identifier (letters, digits and _, not "
                              "starting with a digit), so ${{...}} could not refer to it")
        if not value.strip():
            raise ConfigError(f"{prefix}{PATHS}.{name}: empty; give a folder (an empty one would root every path "
                              f"using ${{{name}}} at /)")
        if "${" in value:
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

    substituted = _REFERENCE.sub(lookup, node)
    rest = _REFERENCE.sub("", node)
    if "${" in rest:  # `${}`, `${a-b}`, `${root` ...: a typo, not a literal path
        bad = rest[rest.index("${"):][:40]
        raise ConfigError(f"{where + ': ' if where else ''}{key}: {bad!r} is not a valid reference; write "
                          f"${{NAME}} with NAME from the {PATHS}: block")
    return substituted

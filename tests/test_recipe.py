"""Recipes: loading, typed overrides, and every error path, before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from conftest import REPO
from d2ctool.config import ConfigError, bounded, build, nested, parse_override, valid_keys
from d2ctool.recipe import Recipe, load_recipe, recipe_yaml


def test_defaults_and_tiny_recipe():
    defaults = load_recipe(None)
    assert defaults.prepare.shard_size == 1000 and defaults.prepare.synthetic.num_classes == 10
    tiny = load_recipe(REPO / "recipes" / "tiny.yaml")
    assert tiny.prepare.name == "synthetic"
    assert tiny.prepare.synthetic.resolution == 64
    assert tiny.prepare.workers == 0  # a default filled in


def test_overrides_absolute_relative_and_typed():
    r = load_recipe(REPO / "recipes" / "tiny.yaml",
                    ["prepare.shard_size=17", "seed=3", "synthetic.resolution=32", "name=007", "labels=null"],
                    section="prepare")
    assert r.prepare.shard_size == 17 and r.prepare.seed == 3
    assert r.prepare.synthetic.resolution == 32
    assert r.prepare.name == "007"  # a string field keeps the text verbatim
    assert r.prepare.labels is None
    assert load_recipe(None, ["labels=/x/y.txt"], "prepare").prepare.labels == "/x/y.txt"
    # PyYAML reads 4e-3 (no dot) as text; a float field still takes it as a number
    assert load_recipe(None, ["discrete.train.base_lr=4e-3"]).discrete.train.base_lr == 0.004


def test_resolved_config_round_trips():
    r = load_recipe(REPO / "recipes" / "tiny.yaml", ["shard_size=5"], "prepare")
    text = recipe_yaml(r)
    assert yaml.safe_load(text)["prepare"]["shard_size"] == 5
    assert build(Recipe, yaml.safe_load(text)) == r


@pytest.mark.parametrize("override, message", [
    ("prepare.shard_size=abc", "prepare.shard_size: expected an integer, got 'abc'"),
    ("shard_size=1.5", "prepare.shard_size: expected an integer, got 1.5"),
    ("shard_size=true", "prepare.shard_size: expected an integer, got True"),
    ("shard_size=0", "prepare.shard_size: must be >= 1, got 0"),
    ("synthetic.resolution=99999", "prepare.synthetic.resolution: must be <= 4096"),
    ("prepare.shard_sise=3", "unknown key 'prepare.shard_sise'; did you mean prepare.shard_size"),
    ("shardsize=3", "unknown key 'shardsize'; did you mean prepare.shard_size"),
    ("nonsense.key=1", "unknown key 'nonsense.key'"),
    ("prepare.synthetic=3", "'prepare.synthetic' is a section"),
    ("shard_size", "expected KEY=VALUE"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [override], "prepare")
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("prepare:\n  shard_size: many\n", "r.yaml: prepare.shard_size: expected an integer, got 'many'"),
    ("prepare:\n  synthetic:\n    num_clases: 5\n", "unknown key 'prepare.synthetic.num_clases'; did you mean prepare.synthetic.num_classes"),
    ("prepair:\n  shard_size: 5\n", "unknown key 'prepair'; did you mean prepare"),
    ("prepare: [1, 2]\n", "prepare: expected a mapping"),
    ("- just\n- a list\n", "a recipe is a mapping of sections"),
    ("prepare:\n  shard_size: [\n", "not valid YAML"),
])
def test_recipe_file_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert message in str(err.value)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


@dataclass
class Inner:
    betas: list[float] = nested(lambda: [0.9, 0.95])
    mode: str = "cosine"


@dataclass
class Outer:
    lr: float = bounded(1e-4, min=0.0)
    fusion: str | None = None
    inner: Inner = nested(Inner)


@dataclass
class WithChoice:
    fusion: Literal["none", "add"] = "none"


def test_machinery_on_other_types():
    assert build(Outer, {"lr": 1, "inner": {"betas": [0.5, 1]}}).inner.betas == [0.5, 1.0]
    with pytest.raises(ConfigError, match=r"inner.betas\[1\]: expected a number"):
        build(Outer, {"inner": {"betas": [0.5, "x"]}})
    with pytest.raises(ConfigError, match="lr: must be >= 0.0"):
        build(Outer, {"lr": -1})
    with pytest.raises(ConfigError, match="fusion: expected one of 'none', 'add', got 'qformer'"):
        build(WithChoice, {"fusion": "qformer"})
    assert valid_keys(Outer) == ["lr", "fusion", "inner", "inner.betas", "inner.mode"]
    assert parse_override("inner.betas=[0.1, 0.2]", Outer) == (["inner", "betas"], [0.1, 0.2])

"""Class 8: plans and paths that cannot work are refused. `paths:` names are identifiers and their values are not
empty; a `${...}` that is not a valid reference is an error, not a literal path; an optional path given as "" is
refused; and `plan --check-paths` loads each checkpoint in the format its setting needs (an empty or foreign file is
not "found") and checks that an init checkpoint fits the recipe's grid."""

from __future__ import annotations

import pytest
import torch

from d2ctool.config import ConfigError
from d2ctool.recipe import load_recipe

from faults import assert_one_line_error, run_cli


def recipe_file(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("block, fragment", [
    ("{my-root: /x}", "'my-root' is not an identifier"),
    ("{1x: /x}", "'1x' is not an identifier"),
    ("{'a b': /x}", "'a b' is not an identifier"),
    ("{1: /x}", "1 is not an identifier"),
    ("{root: ''}", "paths.root: empty"),
    ("{root: '   '}", "paths.root: empty"),
    ("{root: /x, b: '${root}/y'}", "may not refer to another"),
    ("{root: /x, b: '${'}", "may not refer to another"),
    ("[/x]", "expected a mapping"),
    ("{root: 3}", "expected a mapping of names to path strings"),
])
def test_bad_paths_blocks(tmp_path, block, fragment):
    path = recipe_file(tmp_path, f"paths: {block}\ndiscrete: {{data: /data/encoded}}\n")
    with pytest.raises(ConfigError, match=fragment.replace("$", r"\$").replace("{", r"\{")):
        load_recipe(path)


def test_an_empty_path_given_on_the_command_line(tmp_path):
    path = recipe_file(tmp_path, "paths: {root: /x}\ndiscrete: {data: '${root}/encoded'}\n")
    with pytest.raises(ConfigError, match="paths.root: empty"):
        load_recipe(path, ["paths.root="])
    assert load_recipe(path, ["paths.root=/y"]).discrete.data == "/y/encoded"


@pytest.mark.parametrize("value", ["${}", "${root-dir}/x", "${root", "${ root}/x", "/a/${1x}", "${root}/${}"])
def test_an_invalid_reference_is_an_error_not_a_literal_path(tmp_path, value):
    path = recipe_file(tmp_path, f"paths: {{root: /x}}\ndiscrete: {{data: '{value}'}}\n")
    with pytest.raises(ConfigError, match="discrete.data: .* is not a valid reference"):
        load_recipe(path)


def test_invalid_references_in_lists_and_overrides(tmp_path):
    path = recipe_file(tmp_path, "paths: {root: /x}\n")
    with pytest.raises(ConfigError, match="is not a valid reference"):
        load_recipe(path, ["discrete.init=${root/init.pt"])


@pytest.mark.parametrize("key", ["discrete.data", "tokenizers.vq.checkpoint", "sample.oracle_data",
                                 "continuous.init", "fid.inception_weights"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_optional_path_given_empty_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"{key}: empty"):
        load_recipe(None, [f"{key}={value}"])


def test_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    path = recipe_file(tmp_path, "paths: {root: ''}\n")
    code, err = run_cli(monkeypatch, capsys, "plan", path)
    assert_one_line_error(code, err, "paths.root: empty")


# ---- plan --check-paths ----------------------------------------------------------------------------------------

def tiny_plan_args(tiny_data, *extra):
    return ["plan", "recipes/tiny.yaml", "--check-paths",
            "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
            "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", *extra]


def test_check_paths_passes_with_loadable_files(tiny_data, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, *tiny_plan_args(tiny_data))
    assert code == 0, err


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty (0 bytes)"),
    (b"<html>404</html>", "not a readable PyTorch checkpoint"),
])
def test_check_paths_refuses_empty_and_unreadable_files(tiny_data, tmp_path, monkeypatch, capsys, content, fragment):
    bad = tmp_path / "vq.pt"
    bad.write_bytes(content)
    code, err = run_cli(monkeypatch, capsys, *tiny_plan_args(tiny_data, "--set", f"tokenizers.vq.checkpoint={bad}"))
    assert_one_line_error(code, err, "tokenizers.vq.checkpoint", str(bad), fragment)


def test_check_paths_refuses_a_file_of_the_wrong_kind(tiny_data, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, *tiny_plan_args(
        tiny_data, "--set", f"tokenizers.vq.checkpoint={tiny_data / 'kl-tiny-s4.pt'}"))
    assert_one_line_error(code, err, "tokenizers.vq.checkpoint", "kl tokenizer")


def test_check_paths_refuses_an_init_checkpoint_for_another_grid(tiny_data, tmp_path, monkeypatch, capsys):
    from d2ctool.continuous.load import build_mar, preset_config, save_mar

    torch.manual_seed(0)
    other = tmp_path / "mar-s8.pt"
    save_mar(other, build_mar(preset_config("mar-tiny-s8")), "mar-tiny-s8")  # a 4x4 latent grid; the recipe's is 8x8
    code, err = run_cli(monkeypatch, capsys, *tiny_plan_args(tiny_data, "--set", f"continuous.init={other}"))
    assert_one_line_error(code, err, "continuous.init", "cannot initialise this MAR model", "shape mismatch")
    fits = tmp_path / "mar.pt"
    save_mar(fits, build_mar(preset_config("mar-tiny")), "mar-tiny")
    code, err = run_cli(monkeypatch, capsys, *tiny_plan_args(tiny_data, "--set", f"continuous.init={fits}"))
    assert code == 0, err


def test_check_paths_refuses_a_stage_one_init_for_other_data(tiny_data, tmp_path, monkeypatch, capsys):
    from d2ctool.discrete.config import preset
    from d2ctool.discrete.load import build_model, data_config

    torch.manual_seed(0)
    other = tmp_path / "gpt.pt"
    torch.save({"model": build_model(data_config(preset("gpt-tiny"), 512, 8, 20)).state_dict()}, other)
    code, err = run_cli(monkeypatch, capsys, *tiny_plan_args(tiny_data, "--set", f"discrete.init={other}"))
    assert_one_line_error(code, err, "discrete.init")
    # the check --check-paths runs once the presets agree: the file against the model for the recipe's data
    from d2ctool.discrete.load import load_stage1
    from d2ctool.errors import UserError

    with pytest.raises(UserError, match="shape mismatch"):
        load_stage1(other, data_config(preset("gpt-tiny"), 512, 8, 10))

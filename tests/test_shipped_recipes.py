"""Recipes as package data: names work from any folder; `d2c recipes`, `d2c config`, `d2c plan --recipe`."""

from __future__ import annotations

import pytest

import os

import yaml

from conftest import REPO, run_d2c


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_shipped_recipes_are_listed_and_resolve_from_any_folder(tmp_path):
    listed = run_d2c("recipes", cwd=tmp_path, env=ENV)
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"tiny", "smoke", "imagenet256/mar-b", "imagenet256/d2c-b-add", "imagenet256/discon-b"} <= set(names)
    config = run_d2c("config", "tiny", "--set", "discrete.train.steps=7", cwd=tmp_path, env=ENV)
    assert config.returncode == 0 and yaml.safe_load(config.stdout)["discrete"]["train"]["steps"] == 7
    # the same names with the repository's spelling, from a folder that has no recipes/
    same = run_d2c("config", "recipes/tiny.yaml", "--set", "discrete.train.steps=7", cwd=tmp_path, env=ENV)
    assert same.stdout == config.stdout
    plan = run_d2c("plan", "--recipe", "imagenet256/mar-b", cwd=tmp_path, env=ENV)
    assert plan.returncode == 0 and "imagenet256/mar-b" in plan.stdout


@pytest.mark.slow
def test_unknown_recipe_and_a_plan_given_twice_are_one_line_errors(tmp_path):
    unknown = run_d2c("config", "imagenet256/mar-z", cwd=tmp_path, env=ENV)
    assert unknown.returncode == 2 and "d2c recipes" in unknown.stderr and "imagenet256/mar-b" in unknown.stderr
    twice = run_d2c("plan", "tiny", "--recipe", "tiny", cwd=tmp_path, env=ENV)
    assert twice.returncode == 2 and "give the recipe once" in twice.stderr


def test_each_commands_set_help_names_a_key_of_its_own_section():
    from typer.main import get_command

    from d2ctool.cli import app

    sections = {"prepare": "prepare.", "encode": "encode.", "train-tokenizer": "tokenizer_training.",
                "train-discrete": "discrete.", "train-continuous": "continuous.", "sample": "sample.",
                "fid": "fid.", "fid-ref": "fid.", "plan": "plan."}
    for name, command in get_command(app).commands.items():
        for param in command.params:
            if param.name == "set_" and name in sections:
                assert f"e.g. {sections[name]}" in param.help, (name, param.help)

"""Every example of every `--help` epilog and every command in the code blocks of README.md and docs/*.md,
taken literally.

- Every one is parsed by the real command line (a wrong option, or several values after one `--set`, fails)
  and its recipe and `--set` overrides are loaded and validated as the command would.
- Those that need no ImageNet, official weights, GPU or torchrun run literally, in pipeline order, in a
  sandbox folder whose `recipes/tiny.yaml` is the shipped tiny recipe at the smallest sizes (same paths,
  fewer images and steps), so `runs/tiny/...` fills as the examples say.
- For the others, `d2c plan` runs on the recipe they name (the check a user can make without the data).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_d2c

# what an example needs that a CPU test machine does not have: ImageNet, official files, a GPU cluster
NEEDS_ELSEWHERE = ("/data", "imagenet/", "VIRTUAL_", "inception-2015-12-05", "torchrun", "$", "shards/in-",
                   "shards/imagenet", "refs/imagenet", "--check-paths")
ORDER = ["prepare", "train-tokenizer", "encode", "train-discrete", "train-continuous", "sample", "fid-ref", "fid",
         "sweep", "results", "plan", "recipes", "config"]
SECTIONS = {"prepare": "prepare", "encode": "encode", "train-tokenizer": "tokenizer_training",
            "train-discrete": "discrete", "train-continuous": "continuous", "sample": "sample", "fid": "fid",
            "fid-ref": "fid", "sweep": "sample", "plan": "plan", "config": None}
SMALLEST = {
    "prepare": {"shard_size": 10, "synthetic": {"num_classes": 2, "images_per_class": 6, "resolution": 40}},
    "tokenizer_training": {"codebook_size": 64, "val_images": 4,
                           "train": {"steps": 2, "global_batch_size": 4, "sample_every": 0, "log_every": 1}},
    "encode": {"batch_size": 8},
    "discrete": {"grid_classes": 2, "train": {"steps": 2, "global_batch_size": 4, "sample_every": 0, "log_every": 1}},
    "continuous": {"grid_samples": 2, "train": {"steps": 2, "global_batch_size": 4, "sample_every": 0,
                                                "log_every": 1}, "sampling": {"num_iter": 2}},
    "sample": {"num_images": 4, "batch_size": 4, "grid_classes": 2, "grid_per_class": 2,
               "stage2": {"num_iter": 2}},
    "fid": {"num_ref_images": 4, "batch_size": 4},
}


def epilog_examples() -> list[tuple[str, str]]:
    from typer.main import get_command

    from d2ctool.cli import app

    out = []
    for name, command in get_command(app).commands.items():
        for line in (command.epilog or "").splitlines():
            if line.strip().startswith(("d2c ", "torchrun ")):
                out.append((f"d2c {name} --help", line.strip()))
    return out


def readme_examples(path: Path = REPO / "README.md") -> list[tuple[str, str]]:
    """Commands of the README's bash blocks: continuation lines joined, comments dropped, VAR=... expanded."""
    out, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r"([A-Z_]+)=(.*)", line)
            if assignment:
                variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2)))
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if line.startswith(("d2c ", "torchrun ")):
                out.append((path.relative_to(REPO).as_posix(), line))
    return out


def d2c_argv(line: str) -> list[str]:
    argv = shlex.split(line)
    if argv[0] == "torchrun":
        argv = argv[argv.index("d2ctool") + 1:]
    else:
        argv = argv[1:]
    return argv


ALL = epilog_examples() + [e for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
                            for e in readme_examples(doc)]


def runs_here(line: str) -> bool:
    return not any(marker in line for marker in NEEDS_ELSEWHERE)


def test_examples_were_found_and_most_tiny_ones_run_here():
    sources = {source for source, _ in ALL}
    assert "README.md" in sources and "d2c fid --help" in sources and "d2c sample --help" in sources
    assert sum(runs_here(line) for _, line in ALL) >= 12


@pytest.mark.parametrize("source,line", ALL, ids=[f"{s}: {l[:60]}" for s, l in ALL])
def test_example_parses_and_its_recipe_and_overrides_load(source, line):
    from typer.main import get_command

    from d2ctool.cli import app
    from d2ctool.recipe import load_recipe

    argv = d2c_argv(line)
    name, args = argv[0], argv[1:]
    command = get_command(app).commands[name]
    ctx = command.make_context(name, list(args))  # raises on an unknown option or an extra argument
    params = ctx.params
    if name == "results":
        return
    recipe = params.get("recipe") or params.get("recipe_file")
    if recipe is not None and (REPO / recipe).is_file():
        recipe = REPO / recipe  # else a shipped recipe's name, which load_recipe resolves
    load_recipe(recipe, list(params.get("set_") or []), SECTIONS.get(name))


def sandbox(tmp_path: Path) -> Path:
    root = tmp_path / "sandbox"
    (root / "recipes").mkdir(parents=True)
    shutil.copytree(REPO / "recipes" / "imagenet256", root / "recipes" / "imagenet256")
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())

    def merge(into: dict, new: dict):
        for key, value in new.items():
            if isinstance(value, dict):
                merge(into.setdefault(key, {}), value)
            else:
                into[key] = value

    merge(recipe, SMALLEST)
    (root / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.mark.slow
def test_every_example_that_needs_no_imagenet_runs_literally(tmp_path):
    root = sandbox(tmp_path)
    runnable = [(s, line) for s, line in ALL if runs_here(line)]
    runnable.sort(key=lambda item: ORDER.index(d2c_argv(item[1])[0]))
    env = {**os.environ, "D2C_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for source, line in runnable:
        proc = run_d2c(*d2c_argv(line), cwd=root, env=env)
        assert proc.returncode == 0, f"{source}: {line}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    plans = sorted({a for _, line in ALL if not runs_here(line) for a in d2c_argv(line)
                    if a.startswith("recipes/imagenet256/")})
    for recipe in plans:
        proc = run_d2c("plan", recipe, cwd=root, env=env)
        assert proc.returncode == 0, f"d2c plan {recipe}\n{proc.stderr[-1500:]}"


def test_no_help_text_loses_characters_to_rich_markup():
    """Typer renders help with Rich markup: an unescaped `[fid]` would vanish from `--inception-weights`."""
    from rich.markup import render
    from typer.main import get_command

    from d2ctool.cli import app

    for name, command in get_command(app).commands.items():
        for text in [command.help or "", command.epilog or ""] + [p.help or "" for p in command.params]:
            assert render(text).plain == text.replace("\\[", "["), f"d2c {name}: {text!r}"
    proc = run_d2c("fid", "--help", env={**os.environ, "COLUMNS": "300"})
    assert 'd2ctool[fid]' in proc.stdout

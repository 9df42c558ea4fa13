"""Class 6: a SIGKILL at any instant of writing a checkpoint loses nothing.

The kill is injected deterministically: `D2C_KILL_AT_WRITE=k` makes the training process SIGKILL itself at
its k-th write event (a temporary file complete, a rename, a metrics line; `d2ctool.io.write_event`). A
reference run lists the events (`D2C_WRITE_LOG`); the test kills at every event of the last checkpoint
(metrics line, step file written, renamed, last.pt written, renamed) through the tests' one kill harness
(conftest.kill_at_write), resumes in-process, and checks the
result is the uninterrupted run's: same weights, no temporaries, no duplicated metrics lines."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import kill_at_write, write_events
from d2ctool.config import to_dict
from d2ctool.discrete.train import train_discrete
from d2ctool.io import TMP_SUFFIX
from d2ctool.recipe import load_recipe, recipe_yaml


def overrides(data, out):
    return [f"discrete.data={data}", f"discrete.out={out}", "discrete.model=gpt-tiny", "train.global_batch_size=8",
            "train.steps=2", "train.ckpt_every=1", "train.log_every=1", "train.num_workers=0", "train.sample_every=0",
            "train.ema_decay=0.9", "discrete.grid_classes=2"]


def train(data, out):
    recipe = load_recipe(None, overrides(data, out), "discrete")
    return train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """An uninterrupted run (in this process), with the list of its write events."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _, events = write_events(lambda: train(tiny_data / "encoded", out), out.parent / "writes.log")
    return out, [(n, phase, name) for n, (phase, name) in enumerate(events, 1)]


def last_checkpoint_events(events):
    """The events from the final metrics line to last.pt's rename: every instant of the last checkpoint."""
    start = max(n for n, phase, name in events if name == "metrics.jsonl")
    end = max(n for n, phase, name in events if name == "last.pt" and phase == "renamed")
    window = [(n, phase, name) for n, phase, name in events if start <= n <= end]
    assert [(p, name) for _, p, name in window] == [
        ("appended", "metrics.jsonl"), ("written", "step_0000002.pt"), ("renamed", "step_0000002.pt"),
        ("written", "last.pt"), ("renamed", "last.pt")]  # the order that makes every prefix consistent
    return window


@pytest.mark.slow
def test_the_event_log_shows_step_file_before_last(reference):
    last_checkpoint_events(reference[1])


@pytest.mark.slow
@pytest.mark.parametrize("position", range(5))
def test_a_kill_at_any_write_of_a_checkpoint_loses_nothing(tiny_data, reference, tmp_path, position):
    ref_out, events = reference
    k, phase, name = last_checkpoint_events(events)[position]
    out = tmp_path / "run"
    args = ["train-discrete", *[f"--set={o}" for o in overrides(tiny_data / "encoded", out)]]
    assert kill_at_write(k, *args, log=tmp_path / "killed.log")[-1] == (phase, name)
    if phase == "written":
        assert list(out.rglob(f"*{TMP_SUFFIX}")), "the kill should leave a temporary behind"

    result = train(tiny_data / "encoded", out)  # resume in-process
    assert result.step == 2
    assert result.resumed_from == (2 if (name, phase) in {("step_0000002.pt", "renamed"), ("last.pt", "written"),
                                                            ("last.pt", "renamed")} else 1)
    assert [p.name for p in out.rglob(f"*{TMP_SUFFIX}")] == []  # the killed run's temporaries are gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # no line lost, none duplicated
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000001.pt", "step_0000002.pt"]
    ours = torch.load(ckpts / "last.pt", weights_only=True)
    ref = torch.load(ref_out / "checkpoints" / "last.pt", weights_only=True)
    assert ours["step"] == 2
    for part in ("model", "ema"):
        for key in ref[part]:
            assert torch.equal(ours[part][key], ref[part][key]), (part, key)
    assert (out / "summary.json").is_file()


@pytest.mark.slow
def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_not_duplicated(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # the second cut by the kill
    (out / ".config.yaml.123.tmp").write_text("partial")
    train(tiny_data / "encoded", out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and lines[0]["loss"] != 9.0
    assert not (out / ".config.yaml.123.tmp").exists()

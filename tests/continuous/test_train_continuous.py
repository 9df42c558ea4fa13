"""`d2c train-continuous`: stage 2 on encoded shards with the shared trainer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import kill_at_metrics_line, run_d2c, write_events
from d2ctool.config import to_dict
from d2ctool.continuous.train import ContinuousTask, train_continuous
from d2ctool.recipe import load_recipe, recipe_yaml

COMMON = ["continuous.model=mar-tiny", "continuous.fusion=add", "train.global_batch_size=8", "train.steps=8",
          "train.ckpt_every=3", "train.log_every=1", "train.num_workers=0", "train.sample_every=0",
          "train.ema_decay=0.9", "sampling.num_iter=2", "sampling.num_sampling_steps=5", "continuous.grid_samples=2"]


def overrides(tiny_data, out, *extra):
    return [f"continuous.data={tiny_data / 'encoded'}", f"continuous.out={out}", *COMMON, *extra]


def run(tiny_data, out, *extra):
    recipe = load_recipe(None, overrides(tiny_data, out, *extra), "continuous")
    return train_continuous(recipe.continuous, to_dict(recipe.continuous), recipe_yaml(recipe))


@pytest.mark.slow
def test_data_shapes_come_from_the_encode_manifest(tiny_data):
    recipe = load_recipe(None, overrides(tiny_data, "unused"), "continuous")
    task = ContinuousTask(recipe.continuous)
    cfg = task._model_cfg
    assert (cfg.latent_channels, cfg.latent_size, cfg.code_vocab, cfg.code_size, cfg.num_classes) == (4, 8, 512, 8, 10)
    import numpy as np

    members = next(iter(task.reader(0, 0, 1, 0, 0).raw()))[1]
    latents, label, codes = task.decode(members, np.random.default_rng(0))
    assert latents.shape == (4, 8, 8) and codes.shape == (64,) and 0 <= label < 10


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_identical_weights(tiny_data, tmp_path):
    whole, events = write_events(lambda: run(tiny_data, tmp_path / "whole"), tmp_path / "whole.log")
    assert whole.step == 8 and (tmp_path / "whole" / "grids" / "step_0000008.png").is_file()
    args = ["train-continuous", *[f"--set={o}" for o in overrides(tiny_data, tmp_path / "killed")]]
    kill_at_metrics_line(5, events, args, tmp_path / "killed.log")  # step 5: after checkpoint 3, before 6
    # the grids' sampling settings are sample-time knobs: changing them does not block the resume
    resumed = run(tiny_data, tmp_path / "killed", "sampling.num_sampling_steps=7", "sampling.sampler=dpm-solver++")
    assert resumed.resumed_from == 3
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["model_config"]["fusion"] == "add"


@pytest.mark.slow
def test_loss_falls_on_a_few_samples(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "run", "train.steps=40", "train.base_lr=0.02", "train.ckpt_every=40")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8  # per-step diffusion losses are noisy: average
    assert last < 0.8 * first, losses


@pytest.mark.slow
def test_cli_reports_missing_data_clearly(tmp_path):
    proc = run_d2c("train-continuous", "--set", f"continuous.data={tmp_path}", "--set", f"continuous.out={tmp_path / 'o'}")
    assert proc.returncode == 2 and "is not a finished shard folder" in proc.stderr


def test_weight_decay_spares_the_diffusion_head_biases_and_norms_as_mar_does():
    """MAR (util/misc.py add_weight_decay): no decay on 1-D tensors, biases, and anything under `diffloss`."""
    from d2ctool.continuous.load import build_mar, preset_config
    from d2ctool.discrete.config import preset
    from d2ctool.discrete.model import GPT
    from d2ctool.training.config import TrainConfig
    from d2ctool.training.trainer import make_optimizer

    cfg = TrainConfig(weight_decay=0.02)
    mar = build_mar(preset_config("mar-tiny", {"fusion": "add"}))
    decayed, spared = (set(map(id, g["params"])) for g in make_optimizer(mar, cfg).param_groups)
    for name, p in mar.named_parameters():
        expected = p.dim() >= 2 and not name.startswith("diffloss.")
        assert (id(p) in decayed) == expected and (id(p) in spared) != expected, name
    assert any(n.startswith("diffloss.") and p.dim() >= 2 for n, p in mar.named_parameters())
    gpt_cfg = preset("gpt-tiny")
    gpt_cfg.vocab_size, gpt_cfg.grid, gpt_cfg.num_classes = 64, 4, 10
    gpt = GPT(gpt_cfg)
    decayed, _ = (set(map(id, g["params"])) for g in make_optimizer(gpt, cfg).param_groups)
    assert decayed == {id(p) for p in gpt.parameters() if p.dim() >= 2}

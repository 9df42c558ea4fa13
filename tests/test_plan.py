"""`d2c plan`: every shipped ImageNet recipe plans; counts and FLOPs match independent numbers; bad recipes fail."""

from __future__ import annotations

import functools
import json

import pytest

from conftest import REPO, run_d2c
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe
from d2ctool.continuous.model import mean_mask_ratio
from d2ctool.plan import plan_recipe

RECIPES = sorted((REPO / "recipes" / "imagenet256").glob("*.yaml"))
pytestmark = pytest.mark.slow  # each plan traces full-size models on the meta device (seconds each)


def _plan(name: str, *overrides: str, check_paths: bool = False):
    return plan_recipe(load_recipe(REPO / "recipes" / "imagenet256" / name, list(overrides)), name, check_paths)


@functools.cache
def _shipped(name: str):
    return plan_recipe(load_recipe(REPO / "recipes" / "imagenet256" / name), name)


def _stage(plan, name):
    (stage,) = [s for s in plan.stages if s.name == name]
    return stage


def test_every_shipped_recipe_plans():
    assert {r.name for r in RECIPES} >= {"llamagen-b.yaml", "mar-b.yaml", "d2c-b-qformer.yaml", "d2c-b-add.yaml",
                                         "discon-b.yaml"}
    for recipe in RECIPES:
        text = recipe.read_text()
        assert "GPU-hours" in text and "VIRTUAL_imagenet256_labeled.npz" in text and text.startswith("#")
        plan = _shipped(recipe.name)
        trained = [s for s in plan.stages if s.steps]
        assert trained and all(s.gpu_hours > 0 and s.memory["total"] > 0 for s in trained)
        # a recipe's schedule is whole epochs on the 8 GPUs it plans for
        assert all(abs(s.epochs - round(s.epochs)) < 1e-9 for s in trained), recipe.name
        # the GPU-hours the recipe states are what the plan computes
        assert f"about {plan.total_gpu_hours:.0f} GPU-hours" in text, recipe.name
        assert sorted(plan.inputs) == ["tokenizers.kl.checkpoint", "tokenizers.vq.checkpoint"]


def test_published_parameter_counts_and_gpt_flops_counted_by_hand():
    gpt = _stage(_shipped("llamagen-b.yaml"), "train-discrete")
    mar = _stage(_shipped("mar-b.yaml"), "train-continuous")
    assert round(gpt.params / 1e6) == 111  # LlamaGen GPT-B
    assert round(mar.params / 1e6) == 208  # MAR-B, diffusion head included
    # GPT-B forward by hand: every linear layer on 256 positions, and SDPA's two matmuls (counted in full)
    d, layers, hidden, vocab, n = 768, 12, 2048, 16384, 256
    linear = layers * (4 * d * d + 3 * d * hidden) + d * vocab
    attention = layers * 2 * 2 * n * n * d
    assert gpt.forward_flops == pytest.approx(2 * linear * n + attention, rel=1e-9)
    assert gpt.train_flops == pytest.approx(3 * gpt.forward_flops, rel=1e-9)  # backward = 2 x forward
    # MAR-B steps: 1,281,167 images over 8 ranks of 4 x 64, the last partial batch dropped
    assert mar.steps_per_epoch == 1_281_167 // 8 // 64 // 4 and mar.per_rank_batch == 64


def test_fusions_add_their_own_parameters_and_cost():
    base = _stage(_shipped("mar-b.yaml"), "train-continuous")
    add = _stage(_shipped("d2c-b-add.yaml"), "train-continuous")
    # add: two code-embedding tables (encoder and decoder width) and nothing else
    assert add.params - base.params == 2 * 16384 * 768
    assert add.forward_flops == pytest.approx(base.forward_flops)  # embedding look-ups cost no FLOPs
    assert _stage(_shipped("discon-b.yaml"), "train-continuous").forward_flops > base.forward_flops  # a longer sequence


def test_mean_mask_ratio():
    import numpy as np

    rng = np.random.default_rng(0)
    draws = 1 + 0.25 * rng.standard_normal(2_000_000)
    draws = draws[(draws >= 0.7) & (draws <= 1.0)]
    assert mean_mask_ratio(0.7) == pytest.approx(draws.mean(), abs=2e-3)


@pytest.mark.parametrize("overrides, message", [
    (["plan.gpus=7"], "global_batch_size 256 does not divide over plan.gpus × discrete.train.grad_accum = 7 × 1"),
    (["tokenizers.vq.preset=vq-8"], "the tokenizers' token grids differ"),
    (["tokenizers.vq.preset=vq-tiny-s4", "tokenizers.kl.preset=kl-tiny-s4", "discrete.init=c2i_B_256.pt"],
     "discrete.init loads gpt-b weights with a vocabulary of 16384 codes, but tokenizer vq-tiny-s4 has 512"),
    (["tokenizers.vq.checkpoint=null"], "tokenizers.vq.checkpoint is not set"),
    (["discrete.data=null"], "discrete.data is not set"),
])
def test_recipes_that_cannot_work_fail(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _plan("llamagen-b.yaml", *overrides)


def test_stage2_mismatches_fail():
    with pytest.raises(UserError, match="continuous.init loads mar-b weights made for latent_channels 16"):
        _plan("mar-b.yaml", "tokenizers.vq.preset=vq-tiny-s4", "tokenizers.kl.preset=kl-tiny-s4",
              "continuous.init=mar_base.pth")
    with pytest.raises(UserError, match="continuous-only is the MAR baseline"):
        _plan("mar-b.yaml", "continuous.fusion=add")
    with pytest.raises(UserError, match="global_batch_size 2048 does not divide"):
        _plan("mar-b.yaml", "plan.gpus=8", "continuous.train.grad_accum=3")


def test_paths_come_from_the_paths_block(tmp_path):
    plan = _plan("mar-b.yaml", f"paths.checkpoints={tmp_path}")
    assert plan.inputs["tokenizers.vq.checkpoint"] == f"{tmp_path}/vq_ds16_c2i.pt"
    assert len(plan.missing) == 2
    with pytest.raises(UserError, match="input file\\(s\\) unusable: tokenizers.vq.checkpoint: .* not found"):
        _plan("mar-b.yaml", f"paths.checkpoints={tmp_path}", check_paths=True)
    for name in ("vq_ds16_c2i.pt", "kl16.ckpt"):
        (tmp_path / name).write_bytes(b"")  # an empty file is not "found"
    assert len(_plan("mar-b.yaml", f"paths.checkpoints={tmp_path}").missing) == 2
    with pytest.raises(UserError, match="kl16.ckpt is empty"):
        _plan("mar-b.yaml", f"paths.checkpoints={tmp_path}", check_paths=True)
    recipe = load_recipe(REPO / "recipes" / "imagenet256" / "d2c-b-add.yaml", ["paths.runs=/scratch/r"])
    assert recipe.discrete.out == "/scratch/r/d2c-b-add/discrete"
    assert recipe.sample.continuous == "/scratch/r/d2c-b-add/continuous"
    with pytest.raises(UserError, match="paths.nope=1: expected paths.NAME=VALUE"):
        load_recipe(REPO / "recipes" / "imagenet256" / "d2c-b-add.yaml", ["paths.nope=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("paths: {root: /x}\ndiscrete: {data: '${rot}/encoded'}\n")
    with pytest.raises(UserError, match=r"discrete.data: unknown path \$\{rot\} \(defined: root\)"):
        load_recipe(bad)


def test_cli_prints_the_plan_and_fails_in_one_line(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_d2c("plan", REPO / "recipes" / "imagenet256" / "llamagen-b.yaml", "--json", out, check=True)
    assert "GPU-hours" in proc.stdout and "memory per GPU" in proc.stdout
    assert json.loads(out.read_text())["total_gpu_hours"] > 0
    proc = run_d2c("plan", REPO / "recipes" / "imagenet256" / "mar-b.yaml", "--set", "plan.gpus=6")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not divide" in proc.stderr


def test_trace_step_counts_flops_and_saved_activations_by_hand():
    """Three Linear(8, 8) blocks: each saves its input (weights are not activations); backward computes the
    weight gradients of all three and the input gradients of the last two."""
    import torch
    from torch import nn

    from d2ctool.training.cost import trace_step

    with torch.device("meta"):
        model = nn.Module()
        model.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
    x = torch.zeros(5, 8, device="meta")

    def step():
        h = x
        for block in model.blocks:
            h = block(h)
        return h.sum()

    cost = trace_step(model, step, 5)
    assert cost.forward_flops == 3 * 2 * 8 * 8
    assert cost.train_flops == 3 * 2 * 8 * 8 + 3 * 2 * 8 * 8 + 2 * 2 * 8 * 8
    assert cost.activations == 3 * 8 * 4  # bytes per image
    # checkpointed: the block inputs are kept, and one block's saved tensors exist at a time in backward
    assert cost.activations_checkpointed == 3 * 8 * 4 + 8 * 4


def test_plan_gpus_are_the_config_choices():
    import typing

    from d2ctool.training.config import PlanConfig
    from d2ctool.plan import GPUS

    assert set(typing.get_args(typing.get_type_hints(PlanConfig)["gpu"])) == set(GPUS)


def test_the_tiny_recipe_plans_too():
    plan = plan_recipe(load_recipe(REPO / "recipes" / "tiny.yaml", ["plan.train_images=1000", "plan.gpus=1",
                                                                     "plan.num_classes=10"]), "tiny")
    assert [s.name for s in plan.stages] == ["encode", "train-discrete", "train-continuous"]
    assert plan.stages[1].steps_per_epoch == 1000 // 32
    assert not any("sample.image_size" in n for n in plan.notes)  # unset: the stage-1 run's own
    plan = plan_recipe(load_recipe(REPO / "recipes" / "tiny.yaml", ["plan.train_images=1000", "plan.gpus=1",
                                                                     "plan.num_classes=10", "sample.image_size=256"]),
                       "tiny")
    assert any("sample.image_size 256 differs from encode.resolution 32" in n for n in plan.notes)


def test_sampling_inputs_must_be_named():
    with pytest.raises(UserError, match="sample.continuous is not set"):
        _plan("d2c-b-add.yaml", "sample.continuous=null")
    with pytest.raises(UserError, match="sample.mode oracle-codes conditions stage 2 on discrete codes"):
        _plan("mar-b.yaml", "sample.mode=oracle-codes", "sample.oracle_data=/x")


@pytest.mark.parametrize("fusion", ["add", "crossattn"])
def test_planned_flops_are_the_real_forward_and_backward(fusion):
    """The planner's count for stage 2 (and stage 1) is what FlopCounterMode counts on a real CPU training step
    of the same model, at the same mask ratio: no hand-kept copy of the forward pass."""
    import dataclasses

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from d2ctool.continuous.model import MAR
    from d2ctool.continuous.train import model_config_for_data
    from d2ctool.data.encoded import EncodedManifest
    from d2ctool.discrete.load import build_model
    from d2ctool.discrete.train import model_config_for_data as stage1_config

    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", ["plan.train_images=1000", "plan.gpus=1",
                                                          "plan.num_classes=10", f"continuous.fusion={fusion}"])
    plan = plan_recipe(recipe, "tiny")
    from d2ctool.tokenizers.load import preset_config

    vq, kl = preset_config("vq", recipe.tokenizers.vq.preset), preset_config("kl", recipe.tokenizers.kl.preset)
    grid = recipe.encode.resolution // 4  # the tiny tokenizers' stride
    manifest = EncodedManifest.planned(grid, 10, vq.codebook_size, kl.embed_dim)
    cfg = dataclasses.replace(model_config_for_data(recipe.continuous, manifest), grad_checkpointing=False)
    torch.manual_seed(0)
    mar = MAR(cfg).train()
    latents, labels = torch.randn(2, cfg.latent_channels, cfg.latent_size, cfg.latent_size), torch.tensor([1, 3])
    codes = torch.randint(0, cfg.code_vocab, (2, cfg.code_len))
    # the CPU's fused attention kernel is not counted by FlopCounterMode; the math backend's matmuls are
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss = mar(latents, labels, codes, mask_ratio=mean_mask_ratio(cfg.mask_ratio_min))
        forward = counter.get_total_flops()
        loss.backward()
        total = counter.get_total_flops()
    stage2 = _stage(plan, "train-continuous")
    assert stage2.params == sum(p.numel() for p in mar.parameters())
    assert (stage2.forward_flops, stage2.train_flops) == (forward / 2, total / 2)

    gpt = build_model(stage1_config(recipe.discrete, manifest)).train()
    codes = torch.randint(0, gpt.cfg.vocab_size, (2, gpt.cfg.grid**2))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        gpt.loss(codes, labels).backward()
    assert _stage(plan, "train-discrete").train_flops == counter.get_total_flops() / 2

"""Stage 1, RAR: official keys and containers, permuted and cached forward passes, the power-cosine CFG
schedule, the permutation anneal, resume-exact training, and sampling through the whole chain."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import kill_at_metrics_line, perturbed, read_manifest, sample_overrides, write_events
from d2ctool.config import to_dict
from d2ctool.discrete.config import SAMPLING_PRESETS, PermutationConfig, RARConfig, SamplingConfig, preset
from d2ctool.discrete.generate import cfg_scale_at, generate
from d2ctool.discrete.load import build_model, data_config, load_stage1
from d2ctool.discrete.rar import RAR
from d2ctool.discrete.train import DiscreteTask, train_discrete
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.sampling.run import sample

TINY = RARConfig(dim=64, n_layer=2, n_head=4, mlp_dim=128, vocab_size=32, num_classes=5, grid=4)


def random_model(cfg=TINY, seed=0) -> RAR:
    torch.manual_seed(seed)
    return perturbed(RAR(cfg))


@pytest.mark.parametrize("name, manifest", [("rar-b", "manifest_rar_b.tsv"), ("rar-l", "manifest_rar_l.tsv")])
def test_presets_have_the_official_keys_and_shapes(name, manifest):
    with torch.device("meta"):
        model = build_model(data_config(preset(name), 1024, 16, 1000))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == read_manifest(manifest)


@pytest.mark.parametrize("name, params", [("rar-xl", 955_425_024), ("rar-xxl", 1_498_520_704)])
def test_larger_presets_have_the_released_parameter_counts(name, params):  # README_RAR's table
    with torch.device("meta"):
        model = build_model(data_config(preset(name), 1024, 16, 1000))
    assert sum(p.numel() for p in model.parameters()) == params


def test_official_id_layout_and_zero_modulations():
    model = RAR(TINY)
    assert model.embeddings.num_embeddings == 32 + 1 + 5 + 1  # codes, mask, classes, null
    assert model.class_ids(torch.tensor([0, 4, model.null_class])).tolist() == [33, 37, 38]
    assert all(b.adaLN_modulation[1].weight.count_nonzero() == 0 for b in model.blocks)


def test_bin_container_loads_strictly_and_carries_its_shape(tmp_path):
    model = random_model()
    path = tmp_path / "rar_tiny.bin"
    torch.save(model.state_dict(), path)  # the released files are bare state dicts
    wanted = data_config(preset("rar-tiny"), 1024, 16, 1000)  # what `sample` assumes for ImageNet
    wanted = replace(wanted, mlp_dim=128)
    loaded, info = load_stage1(path, wanted)
    assert info["weights"] == "(raw state dict)"
    assert (loaded.cfg.vocab_size, loaded.cfg.num_classes, loaded.cfg.grid) == (32, 5, 4)  # read from the file
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    broken = model.state_dict()
    broken["blocks.1.attn.q_norm.weight"] = torch.ones(17)
    torch.save(broken, path)
    with pytest.raises(UserError, match=r"blocks.1.attn.q_norm.weight \[17\] vs \[16\]"):
        load_stage1(path, wanted)
    with pytest.raises(UserError, match="is a RAR checkpoint but the preset asked for is a GPT one"):
        load_stage1(path, data_config(preset("gpt-b"), 1024, 16, 1000))


def test_cached_logits_equal_the_full_forward_at_every_position():
    model = random_model()
    codes = torch.randint(0, 32, (3, 16))
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    full = model(codes, labels)
    model.setup_cache(3)
    cached = [model.prefill(labels)]
    for i in range(15):
        cached.append(model.step(codes[:, i], i))
    model.clear_cache()
    assert torch.allclose(torch.stack(cached, 1), full, atol=1e-5)
    assert torch.equal(model(codes, labels, torch.arange(16).expand(3, 16)), full)  # raster is the default order


def test_permuted_logits_see_only_the_codes_earlier_in_their_order():
    model = random_model()
    codes = torch.randint(0, 32, (1, 16))
    labels = torch.tensor([2])
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))[None]
    base = model(codes, labels, order)
    assert not torch.allclose(base, model(codes, labels))  # the order is an input of the model
    for k in (0, 5, 15):  # logits for code order[k]: unchanged by codes order[k:], changed by order[:k]
        later = codes.clone()
        later[0, order[0, k:]] = (later[0, order[0, k:]] + 1) % 32
        assert torch.allclose(model(later, labels, order)[0, order[0, k]], base[0, order[0, k]], atol=1e-5)
        if k:
            earlier = codes.clone()
            earlier[0, order[0, :k]] = (earlier[0, order[0, :k]] + 1) % 32
            assert not torch.allclose(model(earlier, labels, order)[0, order[0, k]], base[0, order[0, k]])


def test_power_cosine_cfg_schedule_values():
    rar_b = SAMPLING_PRESETS["rar-b"]  # g 16, power 2.75
    assert cfg_scale_at(0, 256, rar_b) == 1.0
    # 0.5 ** 2.75 = 0.148651, cos(pi * 0.148651) = 0.892923, so 1 + 15 * (1 - 0.892820) / 2
    assert cfg_scale_at(128, 256, rar_b) == pytest.approx(1.803080, abs=1e-5)
    assert cfg_scale_at(255, 256, rar_b) == pytest.approx(15.99576, abs=1e-4)  # never quite reaches g
    constant = replace(rar_b, cfg_power=0.0)  # (t/N)^0 = 1: the full scale from the first code on
    assert [cfg_scale_at(t, 256, constant) for t in (0, 1, 200)] == [16.0, 16.0, 16.0]
    assert cfg_scale_at(3, 7, SamplingConfig(cfg_scale=4.0, cfg_schedule="linear")) == 2.5


def test_sampling_presets_are_the_released_settings():
    released = {"rar-b": (16.0, 2.75, 1.0), "rar-l": (15.5, 2.5, 1.02), "rar-xl": (6.9, 1.5, 1.02),
                "rar-xxl": (8.0, 1.2, 1.02)}
    for name, (g, power, temperature) in released.items():
        s = SamplingConfig(preset=name, cfg_scale=2.0, top_k=7).resolved()
        assert (s.cfg_scale, s.cfg_schedule, s.cfg_power, s.temperature, s.top_k, s.top_p) == \
            (g, "power-cosine", power, temperature, 0, 1.0)
    with pytest.raises(UserError, match="unknown stage-1 sampling preset 'rar-m'"):
        SamplingConfig(preset="rar-m").resolved()


def test_guided_greedy_generation_follows_the_schedule_of_the_full_forward():
    model = random_model()
    labels = torch.tensor([1, 2, 3])
    sampling = SamplingConfig(cfg_scale=5.0, cfg_schedule="power-cosine", cfg_power=1.5, top_k=1)
    codes = generate(model, labels, sampling, torch.Generator().manual_seed(0))
    cond, uncond = model(codes, labels), model(codes, torch.full_like(labels, model.null_class))
    scales = torch.tensor([cfg_scale_at(t, 16, sampling) for t in range(16)])[None, :, None]
    assert torch.equal((uncond + scales * (cond - uncond)).argmax(-1), codes)
    a = generate(model, labels, replace(sampling, top_k=0), torch.Generator().manual_seed(7))
    assert torch.equal(a, generate(model, labels, replace(sampling, top_k=0), torch.Generator().manual_seed(7)))


def test_permutation_anneal_and_orders():
    anneal = PermutationConfig()  # rar.yaml: 1 until 125k, linear to 0 at 187.5k
    assert [anneal.probability(s) for s in (0, 125_000, 156_250, 187_500, 249_999)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert PermutationConfig(0, 0).probability(0) == 0.0  # an empty window: raster order throughout
    model = random_model().train()
    model.random_ratio.fill_(0.0)
    assert torch.equal(model.sample_orders(64, torch.device("cpu")), torch.arange(16).expand(64, 16))
    model.random_ratio.fill_(0.5)
    orders = model.sample_orders(400, torch.device("cpu"))
    assert torch.equal(orders.sort(-1).values, torch.arange(16).expand(400, 16))  # every row a permutation
    permuted = (orders != torch.arange(16)).any(-1).float().mean()
    assert 0.4 < permuted < 0.6


def rar_recipe(tiny_data, out, *extra):
    return [f"discrete.data={tiny_data / 'encoded'}", f"discrete.out={out}", "discrete.model=rar-tiny",
            "train.global_batch_size=8", "train.steps=10", "train.ckpt_every=4", "train.log_every=2",
            "train.num_workers=0", "train.sample_every=0", "train.ema_decay=0.9", "sampling.top_k=0",
            "discrete.grid_classes=2", "discrete.permutation.anneal_start=3", "discrete.permutation.anneal_end=8",
            *extra]


def run_rar(overrides):
    recipe = load_recipe(None, overrides, "discrete")
    return train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))


@pytest.mark.slow
def test_training_anneals_the_permutation_per_step(tiny_data):
    recipe = load_recipe(None, rar_recipe(tiny_data, "unused"), "discrete")
    task = DiscreteTask(recipe.discrete)
    model = task.build_model()
    assert isinstance(model, RAR) and model.cfg.vocab_size == 512 and model.cfg.grid == 8
    assert model.cfg.attn_dropout == 0.1 and model.cfg.class_dropout == 0.1
    seen = []
    for step in range(10):
        task.before_step(model, step)
        seen.append(model.random_ratio.item())
    assert seen == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0], abs=1e-6)
    with pytest.raises(UserError, match="anneal_end 2 comes before anneal_start 3"):
        DiscreteTask(load_recipe(None, rar_recipe(tiny_data, "x", "discrete.permutation.anneal_end=2"),
                                 "discrete").discrete)


@pytest.mark.slow
def test_killed_and_resumed_rar_run_ends_with_identical_weights(tiny_data, tmp_path):
    whole, events = write_events(lambda: run_rar(rar_recipe(tiny_data, tmp_path / "whole")), tmp_path / "whole.log")
    assert whole.step == 10
    args = ["train-discrete", *[f"--set={o}" for o in rar_recipe(tiny_data, tmp_path / "killed")]]
    kill_at_metrics_line(4, events, args, tmp_path / "killed.log")  # step 8: after checkpoint 4, before 8
    resumed = run_rar(rar_recipe(tiny_data, tmp_path / "killed"))
    assert resumed.resumed_from == 4 and resumed.step == 10  # resumed inside the anneal window
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["model_config"]["family"] == "rar"
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    losses = [[json.loads(l)["loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("whole", "killed")]
    assert losses[0] == losses[1]
    model, info = load_stage1(tmp_path / "whole")
    assert isinstance(model, RAR) and info["weights"] == "ema"
    with pytest.raises(UserError, match="holds a RAR model, but a GPT preset was asked for"):
        load_stage1(tmp_path / "whole", data_config(preset("gpt-tiny"), 512, 8, 10))


@pytest.fixture(scope="module")
def rar_run(tiny_models):
    run_rar(rar_recipe(tiny_models, tiny_models / "rar", "train.steps=2"))
    return tiny_models / "rar"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["two-stage", "discrete-only"])
def test_sample_with_a_rar_stage_one(tiny_models, rar_run, tmp_path, mode):
    recipe = load_recipe(None, sample_overrides(tiny_models, mode, f"sample.discrete={rar_run}",
                                                "sample.stage1.preset=rar-b"), "sample")
    result = sample(recipe.sample, recipe.tokenizers, tmp_path / mode, recipe_yaml(recipe))
    assert result.num_images == 20
    assert np.load(tmp_path / mode / "samples.npz")["arr_0"].shape == (20, 32, 32, 3)
    manifest = json.loads((tmp_path / mode / "manifest.json").read_text())
    assert manifest["loaded"]["stage1"]["family"] == "rar"
    assert manifest["loaded"]["stage1"]["sampling"]["cfg_schedule"] == "power-cosine"


@pytest.mark.slow
def test_official_rar_file_samples_and_mismatches_are_refused_first(tiny_models, tmp_path):
    cfg = data_config(preset("rar-tiny"), 512, 8, 10)  # over the tiny VQ (512 codes, 8x8 at 32 px)
    torch.manual_seed(0)
    torch.save(RAR(cfg).state_dict(), tmp_path / "rar_tiny.bin")
    common = (f"sample.discrete={tmp_path / 'rar_tiny.bin'}", "sample.discrete_preset=rar-tiny",
              "sample.image_size=32")
    recipe = load_recipe(None, sample_overrides(tiny_models, "discrete-only", *common), "sample")
    assert sample(recipe.sample, recipe.tokenizers, tmp_path / "ok", recipe_yaml(recipe)).num_images == 20
    # a RAR over another codebook (e.g. rar_b.bin, 1024 MaskGIT codes) with this VQ: refused, naming both sides
    torch.save(RAR(replace(cfg, vocab_size=1024)).state_dict(), tmp_path / "rar_1024.bin")
    recipe = load_recipe(None, sample_overrides(tiny_models, "two-stage", *common,
                                                f"sample.discrete={tmp_path / 'rar_1024.bin'}"), "sample")
    with pytest.raises(UserError, match=r"RAR model .*rar_1024.bin makes 8x8 codes from a vocabulary of 1024, "
                                        r"but the VQ tokenizer .*vq-tiny-s4.pt has a codebook of 512"):
        sample(recipe.sample, recipe.tokenizers, tmp_path / "refused", recipe_yaml(recipe))
    # the right codebook on another grid (image_size 64 -> 16x16 codes)
    recipe = load_recipe(None, sample_overrides(tiny_models, "discrete-only", *common, "sample.image_size=64"),
                         "sample")
    with pytest.raises(UserError, match=r"makes 8x8 codes .* codebook of 512 and a 16x16 grid"):
        sample(recipe.sample, recipe.tokenizers, tmp_path / "refused", recipe_yaml(recipe))
    assert not (tmp_path / "refused").exists()


def test_tiny_model_overfits_and_greedy_generation_reproduces():
    cfg = replace(TINY, class_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    torch.manual_seed(0)
    model = RAR(cfg).train()  # random_ratio 0: raster order, as at the end of the anneal
    codes = torch.randint(0, 32, (4, 16))
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.loss(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = generate(model.eval(), labels, SamplingConfig(cfg_scale=1.0, top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(out, codes)

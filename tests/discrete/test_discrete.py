"""Stage 1: LlamaGen-compatible GPT, KV-cache generation, and training with the shared trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import REPO, kill_at_metrics_line, perturbed, read_manifest, write_events
from d2ctool.discrete.config import GPTConfig, SamplingConfig, preset
from d2ctool.discrete.generate import filter_logits, generate
from d2ctool.discrete.load import data_config, load_stage1
from d2ctool.discrete.model import GPT, rope_table_2d
from d2ctool.discrete.train import train_discrete
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.config import to_dict

TINY = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=5, grid=4, multiple_of=32)


def random_model(cfg=TINY, seed=0) -> GPT:
    torch.manual_seed(seed)
    return perturbed(GPT(cfg))


@pytest.mark.parametrize("name, manifest", [("gpt-b", "manifest_gpt_b.tsv"), ("gpt-l", "manifest_gpt_l.tsv")])
def test_presets_have_the_official_keys_and_shapes(name, manifest):
    with torch.device("meta"):
        model = GPT(data_config(preset(name), 16384, 16, 1000))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == read_manifest(manifest)


def test_rope_table_follows_llamagen():
    table = rope_table_2d(grid=3, head_dim=8, base=10000.0)
    assert table.shape == (10, 4, 2)
    assert torch.count_nonzero(table[0]) == 0  # the class token is not rotated: its q and k vanish
    # slots 0..1 rotate by the row index, slots 2..3 by the column index; frequencies 1/10000^(2k/4)
    freqs = torch.tensor([1.0, 1.0 / 100.0])
    for pos in range(9):
        row, col = divmod(pos, 3)
        angles = torch.cat([row * freqs, col * freqs])
        assert torch.allclose(table[1 + pos, :, 0], angles.cos(), atol=1e-6)
        assert torch.allclose(table[1 + pos, :, 1], angles.sin(), atol=1e-6)


def test_swiglu_hidden_size_rule():
    assert preset("gpt-b").ffn_hidden == 2048 and preset("gpt-l").ffn_hidden == 2816


def test_cached_logits_equal_full_forward_at_every_position():
    model = random_model()
    codes = torch.randint(0, 32, (3, 16))
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    full = model(codes, labels)
    model.setup_cache(3)
    cached = [model.forward_cached(None, labels, torch.tensor([0]))]
    for i in range(15):
        cached.append(model.forward_cached(codes[:, i:i + 1], None, torch.tensor([i + 1])))
    model.clear_cache()
    assert torch.allclose(torch.cat(cached, 1), full, atol=1e-5)
    # a multi-position slice through the cache (prefill of a prefix) agrees as well
    model.setup_cache(3)
    model.forward_cached(None, labels, torch.tensor([0]))
    chunk = model.forward_cached(codes[:, :6], None, torch.arange(1, 7))
    model.clear_cache()
    assert torch.allclose(chunk, full[:, 1:7], atol=1e-5)


@pytest.mark.parametrize("container", ["model", "module", "state_dict", "raw"])
def test_official_format_checkpoint_loads_strictly(tmp_path, container):
    model = random_model()
    sd = model.state_dict()
    assert "rope" not in sd  # like LlamaGen's freqs_cis, the RoPE table is not in the state dict
    path = tmp_path / "c2i_tiny.pt"
    torch.save(sd if container == "raw" else {container: sd}, path)
    loaded, info = load_stage1(path, TINY)
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    bad = dict(sd)
    bad["output.weight"] = torch.zeros(33, 64)
    torch.save({"model": bad}, path)
    with pytest.raises(UserError, match=r"output.weight \[33, 64\] vs \[32, 64\]"):
        load_stage1(path, TINY)


def test_filtering_keeps_top_k_and_nucleus():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # sorted: 3.0 (0.644), 2.0 (0.237), 1.0 (0.087), 0.0 (0.032)
    assert probs[1] < 0.7 < probs[1] + probs[2]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]


def test_generation_is_deterministic_and_guided():
    model = random_model()
    labels = torch.tensor([1, 2, 3])
    sampling = SamplingConfig(cfg_scale=2.0, top_k=10, top_p=0.95)
    a = generate(model, labels, sampling, torch.Generator().manual_seed(7))
    b = generate(model, labels, sampling, torch.Generator().manual_seed(7))
    assert a.shape == (3, 16) and torch.equal(a, b) and a.max() < 32
    c = generate(model, labels, replace(sampling, cfg_schedule="linear"), torch.Generator().manual_seed(7))
    assert c.shape == (3, 16)
    # greedy generation with CFG equals the argmax of guided full-forward logits, step by step
    greedy = SamplingConfig(cfg_scale=3.0, top_k=1)
    codes = generate(model, labels, greedy, torch.Generator().manual_seed(0))
    cond, uncond = model(codes, labels), model(codes, torch.full_like(labels, 5))
    assert torch.equal((uncond + 3.0 * (cond - uncond)).argmax(-1), codes)


def test_tiny_model_overfits_and_greedy_generation_reproduces():
    cfg = replace(TINY, class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    codes = torch.randint(0, 32, (4, 16))
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.loss(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    out = generate(model, labels, SamplingConfig(cfg_scale=1.0, top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(out, codes)


def discrete_overrides(tiny_data, out, *extra):
    return [f"discrete.data={tiny_data / 'encoded'}", f"discrete.out={out}", "discrete.model=gpt-tiny",
            "train.global_batch_size=8", "train.steps=10", "train.ckpt_every=4", "train.log_every=2",
            "train.num_workers=0", "train.sample_every=0", "train.ema_decay=0.9", "sampling.top_k=0",
            "discrete.grid_classes=2", *extra]


def discrete_recipe(tiny_data, out, *extra):
    return load_recipe(None, discrete_overrides(tiny_data, out, *extra), "discrete")


def run_discrete(recipe):
    return train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))


def discrete_args(tiny_data, out, *extra):
    """`d2c train-discrete` arguments for the run of `discrete_recipe`."""
    return ["train-discrete", *[f"--set={o}" for o in discrete_overrides(tiny_data, out, *extra)]]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_identical_weights(tiny_data, tmp_path):
    whole, events = write_events(lambda: run_discrete(discrete_recipe(tiny_data, tmp_path / "whole")),
                                 tmp_path / "whole.log")
    assert whole.step == 10 and whole.resumed_from == 0
    # the 4th line is step 8's (a line every 2 steps): after the checkpoint of step 4, before that of step 8
    kill_at_metrics_line(4, events, discrete_args(tiny_data, tmp_path / "killed"), tmp_path / "killed.log")
    resumed = run_discrete(discrete_recipe(tiny_data, tmp_path / "killed"))
    assert resumed.resumed_from == 4 and resumed.step == 10
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6, 8, 10]  # no duplicates from the lost steps
    whole_lines = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [l["loss"] for l in lines] == [l["loss"] for l in whole_lines]
    assert (tmp_path / "whole" / "grids" / "step_0000010.png").is_file()
    # the run folder refuses different settings; more steps are fine
    with pytest.raises(UserError, match="different settings"):
        run_discrete(discrete_recipe(tiny_data, tmp_path / "whole", "train.base_lr=0.5"))
    again = run_discrete(discrete_recipe(tiny_data, tmp_path / "whole"))  # complete: nothing to do
    assert again.step == 10 and again.resumed_from == 10 and again.summary == whole.summary
    assert run_discrete(discrete_recipe(tiny_data, tmp_path / "whole", "train.steps=12")).step == 12


@pytest.mark.slow
def test_trained_checkpoint_loads_for_sampling_and_checks_the_vocabulary(tiny_data, tmp_path):
    run_discrete(discrete_recipe(tiny_data, tmp_path / "run", "train.steps=2"))
    model, info = load_stage1(tmp_path / "run")
    assert info["weights"] == "ema" and model.cfg.vocab_size == 512 and model.cfg.grid == 8
    with pytest.raises(UserError, match="vocab_size 512, but the data/tokenizer need 1024"):
        load_stage1(tmp_path / "run", replace(model.cfg, vocab_size=1024))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import d2ctool.discrete.train as train

    real = train.DiscreteTask.loss
    calls = []

    def poisoned(self, model, batch, device):
        calls.append(1)
        loss, parts = real(self, model, batch, device)
        return (loss * float("nan") if len(calls) == 6 else loss), parts

    monkeypatch.setattr(train.DiscreteTask, "loss", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at step 6; stopped. The last good checkpoint \(step 4\)"):
        run_discrete(discrete_recipe(tiny_data, tmp_path / "run"))
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_only_rank0_writes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    args = ["--set", f"discrete.data={tiny_data / 'encoded'}", "--set", f"discrete.out={out}", "--set",
            "discrete.model=gpt-tiny", "--set", "train.global_batch_size=8", "--set", "train.steps=4", "--set",
            "train.log_every=1", "--set", "train.num_workers=0", "--set", "train.sample_every=0",
            "--set", "sampling.top_k=0", "--set", "discrete.grid_classes=1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29733", "-m", "d2ctool", "train-discrete", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("train-discrete: 4 steps") == 1
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer: no line twice
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2  # both ranks' RNG states, saved by rank 0

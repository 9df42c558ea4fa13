"""DisCon's tokenizers through the pipeline: MaskGIT codes + VA-VAE latents with per-channel statistics.

Tiny MaskGIT and VA-VAE presets with random weights, written in the official containers (a bare `.bin`
state dict; a Lightning `{'state_dict': ...}` with training-only keys), then encode -> train-discrete
(GPT, and RAR: DisCon's whole chain) and train-continuous -> sample (two-stage, and discrete-only
through the MaskGIT decoder).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from d2ctool.config import to_dict
from d2ctool.continuous.train import ContinuousTask, train_continuous
from d2ctool.data.shards import iter_tar
from d2ctool.discrete.train import train_discrete
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.sampling.run import sample
from d2ctool.tokenizers.encode import encode
from d2ctool.tokenizers.load import build_tokenizer, load_tokenizer, preset_config

TRAIN = ["train.global_batch_size=8", "train.steps=2", "train.num_workers=0"]


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture(scope="module")
def discon(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("discon")
    torch.manual_seed(1)
    vq = build_tokenizer("vq", preset_config("vq", "maskgit-tiny-s4"))
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()  # codes on the latents' scale, so many codes get used
    torch.save(vq.state_dict(), root / "maskgit.bin")
    kl = build_tokenizer("kl", preset_config("kl", "vavae-tiny-s4"))
    torch.save({"state_dict": {**kl.state_dict(), "loss.logvar": torch.zeros(()),
                               "linear_proj.weight": torch.zeros(16, 8, 1, 1)}}, root / "vavae.pt")
    tokenizers = ["tokenizers.vq.preset=maskgit-tiny-s4", f"tokenizers.vq.checkpoint={root / 'maskgit.bin'}",
                  "tokenizers.kl.preset=vavae-tiny-s4", f"tokenizers.kl.checkpoint={root / 'vavae.pt'}"]
    recipe = load_recipe(None, [*tokenizers, "encode.resolution=32", "encode.batch_size=8", "encode.stats_images=30",
                                "encode.seed=3"], "encode")
    encode(tiny_data / "shards", root / "encoded", recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    recipe = load_recipe(None, [f"discrete.data={root / 'encoded'}", f"discrete.out={root / 'gpt'}",
                                "discrete.model=gpt-tiny", "discrete.sampling.top_k=0", "discrete.grid_classes=1",
                                "discrete.train.sample_every=0", *[f"discrete.{c}" for c in TRAIN]])
    train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))
    recipe = load_recipe(None, [f"discrete.data={root / 'encoded'}", f"discrete.out={root / 'rar'}",
                                "discrete.model=rar-tiny", "discrete.permutation.anneal_start=0",
                                "discrete.permutation.anneal_end=2", "discrete.sampling.top_k=0",
                                "discrete.grid_classes=1", "discrete.train.sample_every=0",
                                *[f"discrete.{c}" for c in TRAIN]])
    train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))
    recipe = load_recipe(None, [f"continuous.data={root / 'encoded'}", f"continuous.out={root / 'mar'}",
                                "continuous.model=mar-tiny", "continuous.fusion=add", "continuous.sampling.num_iter=2",
                                "continuous.sampling.num_sampling_steps=4", "continuous.grid_samples=2",
                                *[f"continuous.{c}" for c in TRAIN]])
    train_continuous(recipe.continuous, to_dict(recipe.continuous), recipe_yaml(recipe))
    return root, tokenizers


@pytest.mark.slow
def test_encode_records_per_channel_statistics_of_the_latents(discon, tiny_data):
    root, _ = discon
    manifest = json.loads((root / "encoded" / "manifest.json").read_text())
    norm = manifest["latent_norm"]
    assert norm["kind"] == "channel" and len(norm["mean"]) == len(norm["std"]) == 8
    assert "posterior samples of 30 random images" in norm["source"] and manifest["scale_factor"] is None
    stats = torch.load(root / "encoded" / "latents_stats.pt")  # LightningDiT's layout, same numbers
    assert stats["mean"].shape == (1, 8, 1, 1) and stats["mean"].flatten().tolist() == pytest.approx(norm["mean"])
    vq, kl = manifest["tokenizers"]["vq"], manifest["tokenizers"]["kl"]
    assert (vq["architecture"], vq["codebook_size"], vq["codebook_dim"]) == ("maskgit-vq", 256, 32)
    assert (kl["architecture"], kl["latent_channels"]) == ("ldm-kl", 8)
    assert "dropped training-only keys: 1 loss.*, 1 linear_proj.*" in kl["weights"]
    # independent check: the posterior's per-channel mean and std from all images' moments (original views)
    moments = np.stack([npy(m["moments.npy"])[0].astype(np.float64) for s in manifest["shards"]
                        for _, m in iter_tar(root / "encoded" / s["file"])])
    mean, var = moments[:, :8], np.exp(moments[:, 8:])
    true_mean = mean.mean(axis=(0, 2, 3))
    true_std = np.sqrt(mean.var(axis=(0, 2, 3)) + var.mean(axis=(0, 2, 3)))
    assert np.abs(np.array(norm["mean"]) - true_mean).max() < 0.2 * true_std.min()
    assert np.abs(np.array(norm["std"]) / true_std - 1).max() < 0.2


@pytest.mark.slow
def test_encode_uses_a_given_stats_file_and_refuses_it_for_the_scale_rule(discon, tiny_data, tmp_path):
    root, tokenizers = discon
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.linspace(-1, 1, 8).view(1, 8, 1, 1), "std": torch.full((1, 8, 1, 1), 0.5)}, stats)
    recipe = load_recipe(None, [*tokenizers, "encode.resolution=32", f"encode.latent_stats={stats}"], "encode")
    encode(tiny_data / "shards", tmp_path / "enc", recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    norm = json.loads((tmp_path / "enc" / "manifest.json").read_text())["latent_norm"]
    assert norm["mean"] == pytest.approx(torch.linspace(-1, 1, 8).tolist()) and norm["std"] == [0.5] * 8
    assert not (tmp_path / "enc" / "latents_stats.pt").exists()
    recipe = load_recipe(None, [*tokenizers, "encode.resolution=32", f"encode.latent_stats={stats}",
                                "encode.latent_norm=scale"], "encode")
    with pytest.raises(UserError, match="encode.latent_stats is set, but the latent normalisation is 'scale'"):
        encode(tiny_data / "shards", tmp_path / "enc2", recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    assert not (tmp_path / "enc2").exists()


def test_stage2_data_and_grids_use_the_manifest_statistics(discon):
    root, _ = discon
    recipe = load_recipe(None, [f"continuous.data={root / 'encoded'}", "continuous.grid_samples=3"])
    task = ContinuousTask(recipe.continuous)
    means, _, codes = task.grid_batch()
    manifest = json.loads((root / "encoded" / "manifest.json").read_text())
    first = next(iter_tar(root / "encoded" / manifest["shards"][0]["file"]))[1]
    moments = npy(first["moments.npy"])[0].astype(np.float32)
    mu, sd = (np.array(manifest["latent_norm"][k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    np.testing.assert_allclose(means[0].numpy(), (moments[:8] - mu) / sd, rtol=1e-5, atol=1e-5)
    assert codes.max() < 256
    assert sorted(p.name for p in (root / "mar" / "grids").iterdir())  # the final grid went through the decoder
    ckpt = torch.load(root / "mar" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["trained_on"]["latent_norm"] == manifest["latent_norm"]


def run(root, tokenizers, out, mode, *extra, stage1="gpt"):
    recipe = load_recipe(None, [*tokenizers, f"sample.mode={mode}", f"sample.discrete={root / stage1}",
                                f"sample.continuous={root / 'mar'}", "sample.num_images=10", "sample.batch_size=10",
                                "sample.stage1.top_k=0", "sample.stage2.num_iter=2",
                                "sample.stage2.num_sampling_steps=4", "sample.grid_classes=2",
                                "sample.grid_per_class=1", *extra], "sample")
    return sample(recipe.sample, recipe.tokenizers, out, recipe_yaml(recipe))


@pytest.mark.parametrize("stage1", ["gpt", "rar"])
@pytest.mark.parametrize("mode", ["two-stage", "discrete-only"])
def test_sampling_through_maskgit_and_vavae(discon, tmp_path, mode, stage1):
    """RAR -> MaskGIT codes -> stage 2 -> VA-VAE decoder is DisCon's chain; GPT over the same codes too."""
    root, tokenizers = discon
    result = run(root, tokenizers, tmp_path / mode, mode, stage1=stage1)
    assert result.num_images == 10
    arr = np.load(tmp_path / mode / "samples.npz")["arr_0"]
    assert arr.shape == (10, 32, 32, 3) and arr.dtype == np.uint8
    loaded = json.loads((tmp_path / mode / "manifest.json").read_text())["loaded"]
    assert loaded["vq"]["name"] == "maskgit-tiny-s4" and loaded["stage1"]["family"] == stage1
    if mode == "two-stage":
        assert loaded["latent_norm"]["kind"] == "channel" and loaded["kl"]["name"] == "vavae-tiny-s4"


@pytest.mark.slow
def test_mismatched_tokenizers_are_refused_naming_both_sides(discon, tiny_data, tmp_path):
    root, tokenizers = discon
    out = tmp_path / "out"
    other_kl = [*tokenizers, f"tokenizers.kl.checkpoint={tmp_path / 'vavae-other.pt'}"]
    torch.manual_seed(5)
    torch.save({"state_dict": build_tokenizer("kl", preset_config("kl", "vavae-tiny-s4")).state_dict()},
               tmp_path / "vavae-other.pt")
    with pytest.raises(UserError, match=r"stage 2 \(.*\) was trained on the latents of the kl tokenizer vavae-tiny-s4 "
                                        r"\(.*vavae.pt, sha256 \w{12}\), but tokenizers.kl is vavae-tiny-s4 "
                                        r"\(.*vavae-other.pt, sha256 \w{12}\)"):
        run(root, other_kl, out, "two-stage")
    llamagen = [*tokenizers, f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}"]  # LlamaGen VQ, 512 codes
    with pytest.raises(UserError, match=r"stage-1 GPT model .*gpt makes 8x8 codes from a vocabulary of 256, but the VQ "
                                        r"tokenizer .*vq-tiny-s4.pt has a codebook of 512"):
        run(root, llamagen, out, "discrete-only")
    assert not out.exists()
    # the loaded tokenizer really is the MaskGIT one the codes came from
    vq, _ = load_tokenizer("vq", "maskgit-tiny-s4", str(root / "maskgit.bin"))
    assert type(vq).__name__ == "MaskGITVQ"

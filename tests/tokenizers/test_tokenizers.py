"""Tokenizers: official state-dict layouts, strict loading of official containers, round trips."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from conftest import read_manifest
from d2ctool.errors import UserError
from d2ctool.tokenizers.load import PRESETS, build_tokenizer, load_tokenizer, preset_config, save_tokenizer


@pytest.mark.parametrize("kind, preset, manifest", [("vq", "vq-16", "manifest_vq16.tsv"),
                                                    ("kl", "kl-16", "manifest_kl16.tsv"),
                                                    ("vq", "maskgit-f16", "manifest_maskgit_vq.tsv"),
                                                    ("kl", "vavae-f16d32", "manifest_vavae_f16d32.tsv")])
def test_full_presets_have_the_official_keys_and_shapes(kind, preset, manifest):
    with torch.device("meta"):  # no memory: shapes only
        model = build_tokenizer(kind, preset_config(kind, preset))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = read_manifest(manifest)
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert ours == official


def small(kind):
    return build_tokenizer(kind, preset_config(kind, f"{kind}-tiny-s4"))


@pytest.mark.parametrize("kind", ["vq", "kl"])
@pytest.mark.parametrize("container", ["model", "ema", "state_dict", "raw", "module-prefixed"])
def test_official_containers_load_strictly(tmp_path, kind, container):
    torch.manual_seed(0)
    model = small(kind)
    sd = model.state_dict()
    if container == "raw":
        payload = sd
    elif container == "module-prefixed":
        payload = {"model": {f"module.{k}": v for k, v in sd.items()}}
    else:
        payload = {container: sd}
    if kind == "kl" and container == "ema":
        payload = {"model": sd, "ema_unused": 1}
    path = tmp_path / "official.pt"
    torch.save(payload, path)
    loaded, info = load_tokenizer(kind, f"{kind}-tiny-s4", str(path))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, sd[key]), key
    assert info.name == f"{kind}-tiny-s4" and len(info.sha256) == 64


def test_mar_training_checkpoint_with_argparse_namespace_loads(tmp_path):
    model = small("kl")
    path = tmp_path / "kl.ckpt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    loaded, info = load_tokenizer("kl", "kl-tiny-s4", str(path))
    assert info.weights == "model"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": small("kl").state_dict(), "obj": Path("/x")}, path)
    with pytest.raises(UserError, match=r"pickled Python object \(pathlib.PosixPath\) that is not loaded for safety"):
        load_tokenizer("kl", "kl-tiny-s4", str(path))


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    sd = small("vq").state_dict()
    sd.pop("quantize.codebook_used")
    sd["extra.weight"] = torch.zeros(1)
    sd["quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "wrong.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as err:
        load_tokenizer("vq", "vq-tiny-s4", str(path))
    message = str(err.value)
    assert "1 missing key(s): quantize.codebook_used" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "quant_conv.weight [3, 3, 1, 1] vs [8, 32, 1, 1]" in message
    # a KL checkpoint given as VQ: many keys, listed a few at a time with a count
    kl_path = tmp_path / "kl.pt"
    torch.save({"model": small("kl").state_dict()}, kl_path)
    with pytest.raises(UserError, match=r"missing key\(s\): .* and \d+ more"):
        load_tokenizer("vq", "vq-tiny-s4", str(kl_path))


def test_bad_files_and_settings(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_tokenizer("vq", "vq-16", str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_tokenizer("vq", "vq-16", str(junk))
    with pytest.raises(UserError, match="checkpoint is not set"):
        load_tokenizer("kl", "kl-16", None)
    with pytest.raises(UserError, match="unknown vq preset 'vq-99'"):
        preset_config("vq", "vq-99")
    ours = tmp_path / "ours.pt"
    save_tokenizer(ours, small("kl"), "kl")
    with pytest.raises(UserError, match="is a kl tokenizer"):
        load_tokenizer("vq", "vq-16", str(ours))


def test_own_format_carries_its_architecture(tmp_path):
    model = small("vq")
    path = tmp_path / "vq.pt"
    save_tokenizer(path, model, "vq", name="vq-mine")
    loaded, info = load_tokenizer("vq", "vq-16", str(path))  # the preset is ignored: the file knows
    assert info.name == "vq-mine" and loaded.cfg == model.cfg


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS["vq"] if p.startswith("vq-tiny")])
def test_vq_round_trip_shapes_and_consistency(preset):
    torch.manual_seed(0)
    model = build_tokenizer("vq", preset_config("vq", preset)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    s = model.stride
    codes = model.encode(images)
    assert codes.shape == (2, 32 // s, 32 // s) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < model.cfg.codebook_size
    out = model.decode_codes(codes)
    assert out.shape == images.shape
    # the search is a true nearest neighbour of the normalised latent among normalised codes
    z = torch.nn.functional.normalize(model.encode_latent(images).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    brute = torch.cdist(z.double(), model.quantize.codebook().double()).argmin(1)
    assert torch.equal(brute.view_as(codes), codes)
    recon, indices, aux = model(images)
    assert torch.equal(indices, codes) and torch.allclose(recon, out, atol=1e-5)
    assert set(aux) == {"codebook", "commit", "latents"}


@pytest.mark.parametrize("preset", [p for p in PRESETS["kl"] if "tiny" in p])
def test_kl_round_trip_and_scale_factor(preset):
    torch.manual_seed(0)
    cfg = preset_config("kl", preset)
    cfg.scale_factor = 0.5
    model = build_tokenizer("kl", cfg).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        moments = model.encode_moments(images)
        s = model.stride
        assert moments.shape == (2, 2 * cfg.embed_dim, 32 // s, 32 // s)
        mean = moments[:, : cfg.embed_dim]
        latents = model.latents_from_moments(moments, sample=False)
        assert torch.allclose(latents, mean * 0.5)
        decoded = model.decode_latents(latents)
        direct = model.decoder(model.post_quant_conv(mean))
        assert torch.allclose(decoded, direct, atol=1e-5) and decoded.shape == images.shape
        g = torch.Generator().manual_seed(1)
        sampled = model.latents_from_moments(moments, generator=g)
        g = torch.Generator().manual_seed(1)
        assert torch.equal(sampled, model.latents_from_moments(moments, generator=g))
        std = torch.exp(0.5 * moments[:, cfg.embed_dim:])
        noise = (sampled / 0.5 - mean) / std
        assert noise.abs().max() < 10 and 0.5 < noise.std() < 1.5


# ---- MaskGIT VQGAN (bytedance/1d-tokenizer) ---------------------------------------------------------

def _gn(x, norm):
    return torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-6)


def test_maskgit_residual_blocks_reproduce_the_released_shortcut():
    """A width-changing block returns h + W h (W applied to its own output); otherwise x + h. No conv biases."""
    from d2ctool.tokenizers.maskgit import ResnetBlock

    F = torch.nn.functional
    torch.manual_seed(0)
    for cin, cout in ((32, 64), (64, 64)):
        block = ResnetBlock(cin, cout, 0.0).eval()
        for p in block.parameters():  # non-trivial norms
            p.data += 0.1 * torch.randn_like(p)
        assert all(conv.bias is None for conv in block.modules() if isinstance(conv, torch.nn.Conv2d))
        x = torch.randn(2, cin, 8, 8)
        h = F.conv2d(F.silu(_gn(x, block.norm1)), block.conv1.weight, padding=1)
        h = F.conv2d(F.silu(_gn(h, block.norm2)), block.conv2.weight, padding=1)
        expected = h + (F.conv2d(h, block.nin_shortcut.weight) if cin != cout else x)
        with torch.no_grad():
            assert torch.allclose(block(x), expected, atol=1e-5)
    assert tuple(ResnetBlock(32, 64, 0.0).nin_shortcut.weight.shape) == (64, 64, 1, 1)


@pytest.mark.slow
def test_maskgit_plain_search_and_its_zero_one_range():
    torch.manual_seed(0)
    model = build_tokenizer("vq", preset_config("vq", "maskgit-tiny-s4")).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()  # codes on the latents' scale: a search with real choices
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # the network sees [0, 1]
        assert torch.allclose(model.encode_latent(images), model.encoder((images + 1) / 2))
        codes = model.encode(images)
        assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
        # plain Euclidean nearest code, no l2 normalisation
        z = model.encode_latent(images).permute(0, 2, 3, 1).reshape(-1, 32).double()
        brute = torch.cdist(z, model.quantize.embedding.weight.double()).argmin(1)
        assert torch.equal(brute.view_as(codes), codes)
        normalised = torch.cdist(torch.nn.functional.normalize(z, dim=-1),
                                 torch.nn.functional.normalize(model.quantize.embedding.weight.double(), dim=-1))
        assert not torch.equal(normalised.argmin(1).view_as(codes), codes)  # the two rules differ here
        # decode: the [0, 1] output clamped as the official wrapper does, returned in [-1, 1]
        raw = model.decoder(model.quantize.embedding.weight[codes].permute(0, 3, 1, 2))
        out = model.decode_codes(codes)
        assert torch.allclose(out, raw.clamp(0, 1) * 2 - 1) and out.shape == images.shape
        assert out.min() >= -1 and out.max() <= 1
    recon, indices, aux = model(images)
    assert torch.equal(indices, codes) and set(aux) == {"codebook", "commit", "latents"}
    assert torch.allclose(recon.clamp(-1, 1), out, atol=1e-5)


def test_maskgit_release_is_a_bare_state_dict_loaded_strictly(tmp_path):
    torch.manual_seed(0)
    sd = build_tokenizer("vq", preset_config("vq", "maskgit-tiny-s4")).state_dict()
    path = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(sd, path)
    loaded, info = load_tokenizer("vq", "maskgit-tiny-s4", str(path))
    assert type(loaded).__name__ == "MaskGITVQ" and info.weights == "(raw state dict)"
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(UserError, match="missing key"):  # a LlamaGen VQ preset does not take it
        load_tokenizer("vq", "vq-tiny-s4", str(path))
    ours = tmp_path / "ours.pt"
    save_tokenizer(ours, loaded, "vq", name="mine")
    again, _ = load_tokenizer("vq", "vq-16", str(ours))  # our own format records the architecture
    assert type(again).__name__ == "MaskGITVQ" and again.cfg == loaded.cfg


# ---- VA-VAE (hustvl/LightningDiT) -------------------------------------------------------------------

def test_vavae_lightning_checkpoint_drops_training_only_keys_by_name(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_tokenizer("kl", preset_config("kl", "vavae-tiny-s4"))
    sd = model.state_dict()
    assert any(k.startswith("decoder.up.2.attn.") for k in sd) and any(k.startswith("encoder.down.2.attn.") for k in sd)
    training_only = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4),
                     "foundation_model.model.cls_token": torch.zeros(1, 1, 16),
                     "foundation_model.model.blocks.0.attn.qkv.weight": torch.zeros(48, 16),
                     "linear_proj.weight": torch.zeros(16, 8, 1, 1)}
    path = tmp_path / "vavae-imagenet256-f16d32-dinov2.pt"
    torch.save({"state_dict": {**sd, **training_only}, "global_step": 10, "epoch": 1}, path)
    loaded, info = load_tokenizer("kl", "vavae-tiny-s4", str(path))
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    assert info.weights == ("state_dict (dropped training-only keys: 2 loss.*, 2 foundation_model.*, "
                            "1 linear_proj.*)")
    assert "dropped 5 training-only key(s)" in capsys.readouterr().err
    # any other stray key is still refused: the drop is by name, not a non-strict load
    torch.save({"state_dict": {**sd, **training_only, "decoder.extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match=r"1 unexpected key\(s\): decoder.extra.weight"):
        load_tokenizer("kl", "vavae-tiny-s4", str(path))


def test_maskgit_training_loss_has_the_official_weights():
    """1d-tokenizer's VectorQuantizer: mean((sg[z_q] - z)^2) + 0.25 * mean((z_q - sg[z])^2)."""
    torch.manual_seed(0)
    model = build_tokenizer("vq", preset_config("vq", "maskgit-tiny-s4"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    _, indices, aux = model(images)
    z = model.encode_latent(images).permute(0, 2, 3, 1)
    z_q = model.quantize.embedding.weight[indices]
    mse = torch.mean((z_q - z) ** 2)
    assert torch.allclose(aux["commit"], mse) and torch.allclose(aux["codebook"], 0.25 * mse)
    aux["commit"].backward()  # weight 1 reaches the encoder, not the codebook
    assert model.quantize.embedding.weight.grad is None and model.encoder.conv_out.weight.grad is not None

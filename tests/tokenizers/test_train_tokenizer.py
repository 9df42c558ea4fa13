"""`d2c train-tokenizer`: learns real reconstructions, keeps its codebook alive, exports a loadable tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_d2c
from d2ctool.tokenizers.load import load_tokenizer
from d2ctool.tokenizers.train import blur_baseline, psnr


def test_psnr_and_blur_baseline_definitions():
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.2  # mse 0.04 on a peak-to-peak range of 2: 10*log10(4/0.04) = 20 dB
    assert torch.allclose(psnr(a, b), torch.tensor([20.0, 20.0]))
    image = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8) / 64
    blurred = blur_baseline(image, 4)
    assert blurred.shape == image.shape
    assert torch.allclose(blurred.mean(), image.mean(), atol=1e-6)  # a low-pass: it keeps the mean


def train(kind, tiny_data, out, *extra):
    return run_d2c("train-tokenizer", kind, tiny_data / "shards", out, "--set", "resolution=16",
                   "--set", "train.steps=400", "--set", "train.global_batch_size=16", "--set", "train.base_lr=0.032",
                   "--set", "train.warmup_steps=10", "--set", "train.ema_decay=0", "--set", "train.num_workers=0",
                   "--set", "train.log_every=25", "--set", "train.sample_every=0", "--set", "train.weight_decay=0",
                   "--set", "val_images=40", *extra, check=True)


@pytest.mark.slow
def test_vq_beats_the_blur_baseline_and_uses_most_of_its_codebook(tiny_data, tmp_path):
    out = tmp_path / "vq"
    proc = train("vq", tiny_data, out, "--set", "codebook_size=32", "--set", "dead_code_steps=10")
    report = json.loads((out / "report.json").read_text())
    assert "codebook usage" in proc.stdout and report["codebook_size"] == 32
    assert report["codebook_usage"] > 0.75
    # one colour per token cell, interpolated: 3 exact floats per cell against the code's 5 bits
    assert report["psnr_db"] > report["blur_baseline_psnr_db"] + 1.0, report
    losses = [json.loads(l)["l2"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0]
    model, info = load_tokenizer("vq", "ignored", str(out / "tokenizer.pt"))
    assert model.cfg.codebook_size == 32 and info.name == "vq-tiny-s4-trained"
    assert (out / "reconstructions.png").is_file()


@pytest.mark.slow
def test_kl_beats_the_blur_baseline(tiny_data, tmp_path):
    out = tmp_path / "kl"
    train("kl", tiny_data, out)
    report = json.loads((out / "report.json").read_text())
    assert report["psnr_db"] > report["blur_baseline_psnr_db"] + 1.0, report
    model, _ = load_tokenizer("kl", "ignored", str(out / "tokenizer.pt"))
    assert model.cfg.embed_dim == 4 and model.cfg.scale_factor == report["scale_factor"]
    # the fitted scale makes the latents stage 2 sees about unit-variance (LDM's rule)
    from d2ctool.data.reader import ShardReader, decode_image, image_member
    from d2ctool.data.transforms import adm_center_crop, to_minus_one_one

    images = torch.stack([torch.from_numpy(to_minus_one_one(adm_center_crop(decode_image(image_member(m)), 16)))
                          for _, m in ShardReader(tiny_data / "shards").raw()])
    with torch.no_grad():
        latents = model.latents_from_moments(model.encode_moments(images))
    assert 0.8 < float(latents.std()) < 1.25

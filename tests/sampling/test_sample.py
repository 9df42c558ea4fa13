"""`d2c sample`: every mode, byte-identical resume, rank independence, clear errors before sampling."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, sample_overrides as overrides
from d2ctool.data.encoded import FORMAT as ENCODED
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.sampling.run import sample


def run(root, out, mode="two-stage", *extra):
    recipe = load_recipe(None, overrides(root, mode, *extra), "sample")
    return sample(recipe.sample, recipe.tokenizers, out, recipe_yaml(recipe))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["two-stage", "discrete-only", "continuous-only", "oracle-codes"])
def test_every_mode_writes_pngs_npz_and_grid(tiny_models, tmp_path, mode):
    out = tmp_path / mode
    result = run(tiny_models, out, mode)
    assert result.num_images == 20 and set(result.timings) == {"stage1", "stage2", "decode"}
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (20, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
    for i in (0, 7, 19):
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{i:06d}.png")), npz["arr_0"][i])
    if mode == "oracle-codes":  # the real images' labels, in data order
        assert len(npz["labels"]) == 20
    else:  # class-balanced: image i has class i mod 10
        assert npz["labels"].tolist() == [i % 10 for i in range(20)]
    assert Image.open(out / "grid.png").size[0] > 2 * 32
    assert (out / "config.yaml").is_file() and (out / "manifest.json").is_file()
    assert run(tiny_models, out, mode).already_complete


_KILL = """
import os
import d2ctool.sampling.run as run
from d2ctool.recipe import load_recipe, recipe_yaml
real, calls = run.generate_batch, []
def dying(chain, labels, start, timings):
    calls.append(start)
    if len(calls) == 2:
        images = real(chain, labels, start, timings)
        run.write_bytes(run.image_path(chain_out, start), run._png(images[0]))  # half a batch on disk
        os._exit(9)
    return real(chain, labels, start, timings)
run.generate_batch = dying
recipe = load_recipe(None, {overrides!r}, "sample")
chain_out = __import__("pathlib").Path({out!r})
run.sample(recipe.sample, recipe.tokenizers, chain_out, recipe_yaml(recipe))
"""


@pytest.mark.slow
def test_killed_and_resumed_run_gives_a_byte_identical_npz(tiny_models, tmp_path):
    run(tiny_models, tmp_path / "whole")
    killed = tmp_path / "killed"
    code = _KILL.format(overrides=overrides(tiny_models), out=str(killed))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not (killed / "samples.npz").exists()
    result = run(tiny_models, killed)
    assert result.generated == 12  # batches 1 and 2 (the killed one and the one never started)
    assert (killed / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tiny_models, tmp_path):
    args = [a for o in overrides(tiny_models) for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's per-process default: same float reductions
    one = subprocess.run([sys.executable, "-m", "d2ctool", "sample", str(tmp_path / "one"), *args], cwd=REPO,
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29743", "-m", "d2ctool", "sample", str(tmp_path / "two"), *args], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sample: 20 images") == 1
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()


@pytest.mark.slow
def test_wrong_combinations_fail_before_sampling(tiny_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="fusion none: use mode continuous-only"):
        run(tiny_models, out, "two-stage", f"sample.continuous={tiny_models / 'none'}")
    with pytest.raises(UserError, match="uses fusion add and needs codes"):
        run(tiny_models, out, "continuous-only", f"sample.continuous={tiny_models / 'add'}")
    with pytest.raises(UserError, match="tokenizers' grids differ: VQ stride 8, KL stride 4"):
        run(tiny_models, out, "two-stage", f"tokenizers.vq.checkpoint={tiny_models / 'vq-tiny-s8.pt'}")
    from d2ctool.tokenizers.load import build_tokenizer, preset_config, save_tokenizer

    small_codebook = preset_config("vq", "vq-tiny-s4")
    small_codebook.codebook_size = 256
    save_tokenizer(tmp_path / "vq256.pt", build_tokenizer("vq", small_codebook), "vq")
    with pytest.raises(UserError, match=r"vocabulary of 512, but the VQ tokenizer .*vq256.pt has a codebook of 256"):
        run(tiny_models, out, "discrete-only", f"tokenizers.vq.checkpoint={tmp_path / 'vq256.pt'}")
    with pytest.raises(UserError, match="latents but the KL tokenizer"):
        cfg = preset_config("kl", "kl-tiny-s4")
        cfg.embed_dim = 8
        save_tokenizer(tmp_path / "kl8.pt", build_tokenizer("kl", cfg), "kl")
        run(tiny_models, out, "two-stage", f"tokenizers.kl.checkpoint={tmp_path / 'kl8.pt'}")
    with pytest.raises(UserError, match="not a multiple of the 10 classes.*use 20 or 30"):
        run(tiny_models, out, "two-stage", "sample.num_images=25")
    # our stage-1 run makes 8x8 codes of a stride-4 VQ: 32 px; asking for 256 px (the old default) is refused
    for mode in ("two-stage", "discrete-only"):
        with pytest.raises(UserError, match=r"sample.image_size is 256, but the stage-1 run .*gpt makes 8x8 codes, "
                                            r"which the VQ tokenizer \(stride 4\) decodes to 32x32 px: set "
                                            r"sample.image_size=32"):
            run(tiny_models, out, mode, "sample.image_size=256")
    assert not out.exists()
    assert run(tiny_models, out, "discrete-only", "sample.image_size=32").num_images == 20  # the size it makes


def _real_encoded(root, count):
    from d2ctool.data.reader import ShardReader
    from d2ctool.data.shards import read_npy

    codes, moments, labels = [], [], []
    for _, members in ShardReader(root / "encoded", 0, 1, manifest_kind=ENCODED).raw():
        codes.append(read_npy(members["codes.npy"])[0])
        moments.append(read_npy(members["moments.npy"])[0])
        labels.append(int(members["cls"]))
        if len(codes) == count:
            break
    return np.stack(codes), np.stack(moments).astype(np.float32), np.array(labels)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vq-reconstruction", "kl-reconstruction"])
def test_reconstruction_modes_decode_the_real_images(tiny_models, tmp_path, mode):
    """The ceilings: the real images' codes through the VQ decoder, their posterior means through the KL one."""
    import torch

    from d2ctool.tokenizers.load import load_tokenizer
    from d2ctool.visual import to_uint8

    out = tmp_path / mode
    run(tiny_models, out, mode)
    npz = np.load(out / "samples.npz")
    codes, moments, labels = _real_encoded(tiny_models, 20)
    assert npz["labels"].tolist() == labels.tolist()
    with torch.no_grad():
        if mode == "vq-reconstruction":
            vq, _ = load_tokenizer("vq", "vq-tiny-s4", tiny_models / "vq-tiny-s4.pt")
            expected = vq.decode_codes(torch.from_numpy(codes.astype(np.int64)).view(20, 8, 8))
        else:
            kl, _ = load_tokenizer("kl", "kl-tiny-s4", tiny_models / "kl-tiny-s4.pt")
            expected = kl.decoder(kl.post_quant_conv(torch.from_numpy(moments[:, :4])))
    assert np.abs(npz["arr_0"].astype(int) - to_uint8(expected).astype(int)).max() <= 1
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    assert manifest["mode"] == mode and manifest["loaded"]["real_images"]["count"] == 20
    assert set(manifest["loaded"]) == {"vq" if mode == "vq-reconstruction" else "kl", "real_images"}


@pytest.mark.slow
def test_manifest_records_sizes_and_speed(tiny_models, tmp_path):
    from d2ctool.continuous.load import load_mar

    run(tiny_models, tmp_path / "s")
    manifest = __import__("json").loads((tmp_path / "s" / "manifest.json").read_text())
    mar, _ = load_mar("mar-tiny", tiny_models / "add")
    assert manifest["loaded"]["stage2"]["parameters"] == sum(p.numel() for p in mar.parameters())
    assert manifest["loaded"]["stage1"]["parameters"] > 0 and manifest["images_per_second"] > 0

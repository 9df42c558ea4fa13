"""Class 5: NaN and ±inf are bad input. Every float setting refuses them; every array read from a user's file is
checked where its format needs finite numbers (weights, statistics, reference statistics, cached features); and no
command writes a non-finite number into a result (metrics, manifests, statistics, images) as if it were complete."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing

import numpy as np
import pytest
import torch

from d2ctool.config import ConfigError
from d2ctool.errors import UserError
from d2ctool.recipe import Recipe, load_recipe

from faults import assert_one_line_error, run_cli

NON_FINITE = [".nan", ".inf", "-.inf", "1e999", "-1e999"]


def float_settings(cls=Recipe, prefix=""):
    """Every float setting of the recipe schema, as a dotted key (found from the type hints, not listed by hand)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from float_settings(tp, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            yield prefix + f.name


FLOAT_KEYS = sorted(float_settings())


def test_the_schema_has_float_settings_to_check():
    assert len(FLOAT_KEYS) > 15 and "sample.stage2.cfg_scale" in FLOAT_KEYS


def _is_list(key):
    cls, *parts = [Recipe, *key.split(".")]
    tp = cls
    for part in parts:
        tp = typing.get_type_hints(tp)[part]
    return typing.get_origin(tp) is list


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_setting_refuses_nan_and_infinity(key):
    for text in NON_FINITE:
        value, where = (f"[0.5, {text}]", re.escape(f"{key}[1]")) if _is_list(key) else (text, key)
        with pytest.raises(ConfigError, match=f"{where}: expected a finite number"):
            load_recipe(None, [f"{key}={value}"], None)


def test_non_finite_numbers_in_a_recipe_file_are_refused(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample:\n  stage2:\n    temperature: .nan\n")
    code, err = run_cli(monkeypatch, capsys, "plan", recipe)
    assert_one_line_error(code, err, "sample.stage2.temperature", "finite")


def test_finite_values_still_pass():
    assert load_recipe(None, ["sample.stage2.cfg_scale=3.5"], "sample").sample.stage2.cfg_scale == 3.5


# ---- weights -------------------------------------------------------------------------------------------

def _poison(path, out, key_filter=lambda k: True, value=float("nan")):
    obj = torch.load(path, weights_only=True)
    key = next(k for k, v in obj["model"].items() if v.is_floating_point() and key_filter(k))
    obj["model"][key] = obj["model"][key].clone().fill_(value)
    torch.save(obj, out)
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_tokenizer_with_non_finite_weights_is_refused_before_encoding(tiny_data, tmp_path, monkeypatch, capsys,
                                                                        value):
    bad = tmp_path / "kl-bad.pt"
    key = _poison(tiny_data / "kl-tiny-s4.pt", bad, value=value)
    out = tmp_path / "enc"
    code, err = run_cli(monkeypatch, capsys, "encode", tiny_data / "shards", out,
                        "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
                        "--set", f"tokenizers.kl.checkpoint={bad}", "--set", "encode.resolution=32")
    assert_one_line_error(code, err, str(bad), key, "NaN or infinite")
    assert not out.exists()


def test_an_official_layout_raw_state_dict_with_nan_is_refused(tiny_data, tmp_path):
    from d2ctool.tokenizers.load import load_tokenizer

    obj = torch.load(tiny_data / "vq-tiny-s4.pt", weights_only=True)
    raw = {k: v.clone() for k, v in obj["model"].items()}
    raw[next(k for k, v in raw.items() if v.is_floating_point())].view(-1)[0] = float("-inf")
    torch.save({"model": raw}, tmp_path / "official.pt")
    with pytest.raises(UserError, match="hold NaN or infinite values"):
        load_tokenizer("vq", "vq-tiny-s4", str(tmp_path / "official.pt"))


# ---- statistics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which, value", [("std", float("nan")), ("std", float("inf")), ("mean", float("nan")),
                                          ("mean", float("-inf"))])
def test_latent_statistics_with_non_finite_values_are_refused(tiny_data, tmp_path, monkeypatch, capsys, which, value):
    stats = {"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}
    stats[which][0, 2] = value
    torch.save(stats, tmp_path / "stats.pt")
    out = tmp_path / "enc"
    code, err = run_cli(monkeypatch, capsys, "encode", tiny_data / "shards", out,
                        "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
                        "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set",
                        "encode.resolution=32", "--set", "encode.latent_norm=channel",
                        "--set", f"encode.latent_stats={tmp_path / 'stats.pt'}")
    assert_one_line_error(code, err, "stats.pt", "not finite")
    assert not out.exists()


@pytest.mark.parametrize("record", [
    {"kind": "scale", "scale": float("nan")}, {"kind": "scale", "scale": 0.0}, {"kind": "scale"},
    {"kind": "channel", "mean": [0.0, float("nan")], "std": [1.0, 1.0]},
    {"kind": "channel", "mean": [0.0], "std": [float("inf")]}, {"kind": "channel", "mean": ["a"], "std": [1.0]},
    {"kind": "other"}, "scale", None])
def test_a_recorded_latent_normalisation_is_checked(record):
    from d2ctool.tokenizers.latent_norm import LatentNorm

    with pytest.raises(UserError, match="manifest.json"):
        LatentNorm.from_record(record, "enc/manifest.json: latent_norm")


def test_encoded_shards_with_a_non_finite_latent_norm_are_refused_by_stage_two(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    from faults import copy_folder, rewrite_manifest

    data = copy_folder(tiny_data / "encoded", tmp_path / "encoded")
    rewrite_manifest(data, lambda m: m.update(latent_norm={"kind": "scale", "scale": float("nan")}))
    code, err = run_cli(monkeypatch, capsys, "train-continuous", "--set", f"continuous.data={data}",
                        "--set", f"continuous.out={tmp_path / 'run'}", "--set", "continuous.model=mar-tiny")
    assert_one_line_error(code, err, "manifest.json", "latent_norm")


# ---- reference statistics and cached features ---------------------------------------------------------------

def _samples(tmp_path, n=4):
    from PIL import Image

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def _no_extraction(monkeypatch):
    import d2ctool.evaluation.fid as fid_module

    extracted = []
    monkeypatch.setattr(fid_module, "extract_features", lambda *a, **k: extracted.append(1))
    return extracted


def _reference(**changes):
    rng = np.random.default_rng(0)
    arrays = {"mu": rng.normal(size=2048), "sigma": np.eye(2048), "mu_s": rng.normal(size=2023),
              "sigma_s": np.eye(2023)}
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _nan_at(shape, index=0):
    a = np.zeros(shape) if len(shape) == 1 else np.eye(shape[0])
    a.reshape(-1)[index] = np.nan
    return a


@pytest.mark.parametrize("changes, fragment", [
    ({"mu": _nan_at((2048,))}, "mu: 1 of 2048 value(s) are not finite"),
    ({"sigma": _nan_at((2048, 2048), 5)}, "sigma: 1 of"),
    ({"mu_s": np.full(2023, np.inf)}, "mu_s: 2023 of 2023"),
    ({"sigma_s": np.where(np.eye(2023) > 0, -np.inf, 0.0)}, "sigma_s:"),
    ({"mu_s": np.zeros(100)}, "mu_s: has shape [100], expected [2023]"),
    ({"sigma_s": np.eye(100)}, "sigma_s: has shape [100, 100], expected [2023, 2023]"),
    ({"sigma_s": None}, "has mu_s without sigma_s"),
    ({"mu": np.zeros((2048, 1))}, "mu: has shape [2048, 1]"),
    ({"mu": np.array(["x"] * 2048)}, "mu: has dtype <U1"),
    ({"sigma": np.array([{"a": 1}], dtype=object)}, "object array"),
    ({"d2c_meta": np.array("not json")}, "d2c_meta"),
    ({"d2c_meta": np.array(json.dumps([1, 2]))}, "d2c_meta"),
])
def test_reference_npz_is_validated_whole_before_any_extraction(tmp_path, monkeypatch, capsys, changes, fragment):
    samples = _samples(tmp_path)
    np.savez(tmp_path / "ref.npz", **_reference(**changes))
    extracted = _no_extraction(monkeypatch)
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "ref.npz", "--features",
                        "inception-random")
    assert_one_line_error(code, err, "ref.npz", fragment)
    assert extracted == [] and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x04K\x01.", b"PK\x03\x04 truncated zip"])
def test_a_reference_that_is_no_npz_or_a_pickle_is_a_clean_error(tmp_path, monkeypatch, capsys, content):
    import pickle

    samples = _samples(tmp_path)
    (tmp_path / "ref.npz").write_bytes(content or pickle.dumps({"mu": [1.0]}))
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "ref.npz", "--features",
                        "inception-random")
    assert_one_line_error(code, err, "ref.npz")


def _fid_cache_run(tmp_path, monkeypatch, capsys, samples):
    return run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "refimgs.npz", "--features",
                   "inception-random", "--out", tmp_path / "m.json", "--set", f"fid.cache_dir={tmp_path / 'cache'}")


@pytest.mark.parametrize("damage", ["nan", "shape", "dtype", "garbage", "object"])
def test_a_damaged_feature_cache_entry_is_recomputed_not_trusted(tmp_path, monkeypatch, capsys, damage):
    from PIL import Image

    samples = _samples(tmp_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "refimgs.npz", arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    code, err = _fid_cache_run(tmp_path, monkeypatch, capsys, samples)
    assert code == 0, err
    first = json.loads((tmp_path / "m.json").read_text())
    entries = sorted((tmp_path / "cache").glob("features-*.npz"))
    assert len(entries) == 2
    for entry in entries:
        with np.load(entry) as data:
            arrays = {k: data[k] for k in data.files}
        if damage == "nan":
            arrays["pool"] = np.full_like(arrays["pool"], np.nan)
        elif damage == "shape":
            arrays["spatial"] = arrays["spatial"][:, :10]
        elif damage == "dtype":
            arrays["pool"] = arrays["pool"].astype(np.int64)
        elif damage == "object":
            arrays["logits"] = np.array([None] * len(arrays["logits"]), dtype=object)
        if damage == "garbage":
            entry.write_bytes(b"PK\x03\x04garbage")
        else:
            with open(entry, "wb") as f:
                np.savez(f, **arrays)
    code, err = _fid_cache_run(tmp_path, monkeypatch, capsys, samples)
    assert code == 0, err
    assert "ignoring damaged cache entry" in err
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["fid"] == pytest.approx(first["fid"]) and math.isfinite(again["fid"])
    del Image


# ---- results are never written non-finite ----------------------------------------------------------------------

def test_write_json_refuses_non_finite_numbers_naming_the_key(tmp_path):
    from d2ctool.io import write_json

    path = tmp_path / "metrics.json"
    path.write_text('{"fid": 3.0}\n')
    for bad in ({"fid": float("nan")}, {"a": [1.0, {"b": float("inf")}]}, {"x": -float("inf")}):
        with pytest.raises(UserError, match="not finite"):
            write_json(path, bad)
    with pytest.raises(UserError, match=r"a\[1\]\.b = inf"):
        write_json(path, {"a": [1.0, {"b": float("inf")}]})
    assert json.loads(path.read_text()) == {"fid": 3.0}  # the previous file is kept
    assert not list(tmp_path.glob(".*tmp"))


def test_fid_does_not_write_a_nan_metric(tmp_path, monkeypatch, capsys):
    import d2ctool.evaluation.fid as fid_module

    samples = _samples(tmp_path)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "refimgs.npz", arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    real = fid_module.compute_metrics
    monkeypatch.setattr(fid_module, "compute_metrics", lambda *a, **k: {**real(*a, **k), "fid": float("nan")})
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "refimgs.npz", "--features",
                        "inception-random", "--out", tmp_path / "m.json", "--set", "fid.cache=false")
    assert_one_line_error(code, err, "m.json", "fid = nan")
    assert not (tmp_path / "m.json").exists()


def test_images_are_never_written_from_non_finite_pixels():
    from d2ctool.visual import to_uint8

    images = torch.zeros(2, 3, 4, 4)
    assert to_uint8(images).shape == (2, 4, 4, 3)
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(UserError, match="batch 7: 1 of 96 value"):
        to_uint8(images, "batch 7")


def test_a_reference_with_nan_statistics_is_not_written(tmp_path):
    from d2ctool.evaluation.features import Features
    from d2ctool.evaluation.reference import Reference, write_reference_npz

    ref = Reference(np.full(2048, np.nan), np.eye(2048), np.zeros(2023), np.eye(2023), 2,
                    Features(np.zeros((0, 2048)), np.zeros((0, 2023)), np.zeros((0, 0))), np.zeros(0, int))
    with pytest.raises(UserError, match="ref.npz: not written, its mu"):
        write_reference_npz(tmp_path / "ref.npz", ref, {})
    assert not list(tmp_path.iterdir())


def test_encode_refuses_moments_float16_cannot_hold(tiny_data, tmp_path, monkeypatch, capsys):
    import d2ctool.tokenizers.encode as encode_module

    real = encode_module.encode_images

    def huge(*args):
        codes, moments = real(*args)
        return codes, moments * 1e6

    monkeypatch.setattr(encode_module, "encode_images", huge)
    out = tmp_path / "enc"
    code, err = run_cli(monkeypatch, capsys, "encode", tiny_data / "shards", out,
                        "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
                        "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set",
                        "encode.resolution=32")
    assert_one_line_error(code, err, "KL moments", "float16", "moments_dtype=float32")
    assert not (out / "manifest.json").exists()


def test_inception_weights_with_nan_are_refused_before_extracting(tmp_path, monkeypatch, capsys):
    from d2ctool.evaluation.network import random_inception

    state = random_inception(0).state_dict()
    key = next(k for k in state if k.startswith("layers.") and state[k].is_floating_point())
    state[key].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "inception.pt")
    samples = _samples(tmp_path)
    np.savez(tmp_path / "ref.npz", **_reference())
    extracted = _no_extraction(monkeypatch)
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "ref.npz",
                        "--inception-weights", tmp_path / "inception.pt")
    assert_one_line_error(code, err, "inception.pt", "NaN or infinite", key)
    assert extracted == []

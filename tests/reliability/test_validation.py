"""Class 4: everything is validated before a run starts, and a run stopped by a check leaves no folder that
refuses the corrected command."""

from __future__ import annotations

import pytest
import torch

from d2ctool.config import ConfigError
from d2ctool.recipe import load_recipe
from d2ctool.runstate import OutputFolder

from faults import assert_one_line_error, run_cli


@pytest.mark.parametrize("device, problem", [
    ("gpu0", "'gpu0' is not a device"),
    ("cuda", "give the GPU index"),
    ("cuda:x", "is not a device"),
])
def test_bad_device_strings_name_the_key(device, problem):
    with pytest.raises(ConfigError, match=f"discrete.train.device: .*{problem}"):
        load_recipe(None, [f"train.device={device}"], "discrete")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_cuda_on_a_cpu_only_machine_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"sample.device: cuda:0 requested, but this machine has 0 CUDA device"):
        load_recipe(None, ["device=cuda:0"], "sample")
    load_recipe(None, ["discrete.train.device=cuda:0"], "sample")  # another command's setting is not this run's concern


def test_devices_this_machine_has_are_accepted():
    assert load_recipe(None, ["train.device=cpu"], "discrete").discrete.train.device == "cpu"


@pytest.mark.parametrize("override", ["discrete.train.seed=-1", "prepare.seed=9223372036854775808",
                                      "fid.random_seed=-5"])
def test_out_of_range_seeds_are_refused_for_every_section(override):
    with pytest.raises(ConfigError, match="a seed must be an integer in 0..2\\*\\*63-1"):
        load_recipe(None, [override], "prepare")


@pytest.mark.slow
def test_a_recipe_that_is_not_text(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    code, err = run_cli(monkeypatch, capsys, "prepare", "synthetic", tmp_path / "out", "--recipe", recipe)
    assert_one_line_error(code, err, str(recipe), "not a text file")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tokenizer_val_is_checked_before_step_one(tiny_data, tmp_path, monkeypatch, capsys):
    import d2ctool.tokenizers.train as train_module

    built = []
    monkeypatch.setattr(train_module.TokenizerTask, "build_model", lambda self: built.append(1))
    out = tmp_path / "tok"
    code, err = run_cli(monkeypatch, capsys, "train-tokenizer", "vq", tiny_data / "shards", out,
                        "--set", f"tokenizer_training.val={tmp_path / 'no-such-val'}")
    assert_one_line_error(code, err, "tokenizer_training.val", "no-such-val", "manifest.json is missing")
    assert built == [] and not out.exists()


def test_a_folder_stopped_before_any_piece_accepts_the_corrected_command(tmp_path):
    first = OutputFolder(tmp_path / "out", "encode", {"encode": {"resolution": 33}})
    assert first.check() is False
    first.start("resolution: 33\n")  # ...then a check fails before the first shard is written
    corrected = OutputFolder(tmp_path / "out", "encode", {"encode": {"resolution": 32}})
    assert corrected.check() is False  # accepted, not "made with different arguments"
    corrected.start("resolution: 32\n")
    corrected.write_record(0, {"file": None})
    again = OutputFolder(tmp_path / "out", "encode", {"encode": {"resolution": 33}})
    with pytest.raises(Exception, match="made with different arguments"):  # once work is done, it is protected
        again.check()


@pytest.mark.slow
def test_fid_rejects_empty_images_and_wrong_dimension_statistics_before_extracting(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    import d2ctool.evaluation.fid as fid_module

    extracted = []
    monkeypatch.setattr(fid_module, "extract_features", lambda *a, **k: extracted.append(1))
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(samples / f"{i:06d}.png")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "ref.npz", "--features",
                        "inception-random")
    assert_one_line_error(code, err, "ref.npz: mu: has shape [64], expected [2048]")
    (samples / "000003.png").write_bytes(b"")
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tmp_path / "ref.npz", "--features",
                        "inception-random")
    assert_one_line_error(code, err, "000003.png: empty file (0 bytes)")
    assert extracted == []

"""Class 7: every checkpoint container is read by one validating reader: non-text keys, a missing or damaged `model`,
a config that is not a mapping, a file of another kind or family, non-tensor entries and pickled objects are one-line
errors naming the file, never a traceback from deep inside loading."""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest
import torch

from d2ctool.checkpoints import load_file
from d2ctool.continuous.load import build_mar, init_from_checkpoint, load_mar, preset_config, save_mar
from d2ctool.discrete.config import preset
from d2ctool.discrete.load import build_model, data_config, load_stage1, model_record
from d2ctool.errors import UserError
from d2ctool.tokenizers.load import load_tokenizer
from d2ctool.checkpoints import CHECKPOINT_FORMAT
from d2ctool.training.trainer import load_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good files of every container we read: our tokenizer, our MAR, a train-discrete run checkpoint."""
    root = tmp_path_factory.mktemp("containers")
    from d2ctool.tokenizers.load import build_tokenizer, preset_config as tok_preset, save_tokenizer

    torch.manual_seed(0)
    save_tokenizer(root / "vq.pt", build_tokenizer("vq", tok_preset("vq", "vq-tiny-s4")), "vq", "vq-tiny-s4")
    mar = build_mar(preset_config("mar-tiny"))
    save_mar(root / "mar.pt", mar, "mar-tiny")
    cfg = data_config(preset("gpt-tiny"), 512, 8, 10)
    gpt = build_model(cfg)
    torch.save({"format": CHECKPOINT_FORMAT, "task": "train-discrete", "model": gpt.state_dict(), "ema": None,
                "optimizer": {}, "step": 1, "epoch": 0, "batch_in_epoch": 1, "rng": [], "config": {},
                "model_config": model_record(cfg)}, root / "gpt.pt")
    return root


def load(kind, path):
    if kind == "vq":
        return load_tokenizer("vq", "vq-tiny-s4", str(path))
    if kind == "mar":
        return load_mar("mar-tiny", path)
    if kind == "gpt":
        return load_stage1(path)
    raise AssertionError(kind)


def rewrite(src, dst, change):
    obj = torch.load(src, weights_only=True)
    change(obj)
    torch.save(obj, dst)
    return dst


def first_float(state):
    return next(k for k, v in state.items() if v.is_floating_point())


DAMAGE = {
    "model missing": (lambda o: o.pop("model"), "no 'model' entry"),
    "model a tensor": (lambda o: o.update(model=torch.zeros(3)), "'model' entry"),
    "model a list": (lambda o: o.update(model=[1, 2]), "'model' entry"),
    "model empty": (lambda o: o.update(model={}), "'model' entry"),
    "integer keys": (lambda o: o.update(model={i: v for i, v in enumerate(o["model"].values())}),
                     "not parameter names"),
    "a tuple key": (lambda o: o["model"].update({("a", 1): torch.zeros(1)}), "not parameter names"),
    "a non-tensor value": (lambda o: o["model"].update({next(iter(o["model"])): 3.0}), "not tensors"),
    "a NaN weight": (lambda o: o["model"][first_float(o["model"])].view(-1).__setitem__(0, float("nan")),
                     "NaN or infinite"),
}


@pytest.mark.parametrize("kind", ["vq", "mar", "gpt"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_containers_are_one_line_errors(files, tmp_path, kind, damage):
    change, fragment = DAMAGE[damage]
    bad = rewrite(files / f"{kind}.pt", tmp_path / f"{kind}-bad.pt", change)
    with pytest.raises(UserError, match=fragment) as e:
        load(kind, bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("kind, key", [("vq", "config"), ("mar", "config"), ("gpt", "model_config")])
@pytest.mark.parametrize("value", [None, "gpt-b", [1, 2], {1: 2}])
def test_a_config_that_is_not_a_mapping(files, tmp_path, kind, key, value):
    bad = rewrite(files / f"{kind}.pt", tmp_path / "bad.pt", lambda o: o.update({key: value}))
    with pytest.raises(UserError, match=f"'{key}' entry must be a mapping"):
        load(kind, bad)


@pytest.mark.parametrize("family", ["xyz", 3, None])
def test_a_stage_one_checkpoint_of_an_unknown_family(files, tmp_path, family):
    bad = rewrite(files / "gpt.pt", tmp_path / "bad.pt", lambda o: o["model_config"].update(family=family))
    with pytest.raises(UserError, match="unknown family"):
        load("gpt", bad)


def test_a_stage_one_config_with_a_wrong_field(files, tmp_path):
    bad = rewrite(files / "gpt.pt", tmp_path / "bad.pt", lambda o: o["model_config"].update(dim="wide"))
    with pytest.raises(UserError, match="bad.pt: its stage-1 model config is invalid"):
        load("gpt", bad)


@pytest.mark.parametrize("given, loader, fragment", [
    ("vq", "mar", "is a 'd2c-tokenizer' file, not a stage-2"),
    ("vq", "gpt", "is a 'd2c-tokenizer' file, not a stage-1"),
    ("mar", "gpt", "is a 'd2c-mar' file, not a stage-1"),
    ("mar", "vq", "is a 'd2c-mar' file, not a vq tokenizer"),
    ("gpt", "mar", "train-discrete"),
    ("gpt", "vq", "is a 'd2c-train-checkpoint' file (`d2c train-discrete`), not a vq tokenizer"),
])
def test_a_file_of_another_kind_is_named_as_such(files, given, loader, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load(loader, files / f"{given}.pt")


def test_a_kl_architecture_recorded_in_a_vq_file(files, tmp_path):
    bad = rewrite(files / "vq.pt", tmp_path / "bad.pt", lambda o: o.update(architecture="ldm-autoencoder-kl"))
    with pytest.raises(UserError, match="unknown tokenizer architecture"):
        load("vq", bad)


def test_init_from_a_damaged_or_foreign_file(files, tmp_path):
    mar = build_mar(preset_config("mar-tiny"))
    bad = rewrite(files / "mar.pt", tmp_path / "bad.pt", lambda o: o.update(model={0: torch.zeros(1)}))
    with pytest.raises(UserError, match="not parameter names"):
        init_from_checkpoint(mar, bad)
    with pytest.raises(UserError, match="d2c-tokenizer"):
        init_from_checkpoint(mar, files / "vq.pt")


@pytest.mark.parametrize("change, fragment", [
    (lambda o: o.pop("model"), "no 'model' entry"),
    (lambda o: o.update(optimizer=[1]), "'optimizer' entry must be a mapping"),
    (lambda o: o.update(step="3"), "step"),
    (lambda o: o.pop("rng"), "rng"),
    (lambda o: o.update(ema={"w": "x"}), "not tensors"),
])
def test_a_damaged_training_checkpoint_is_refused_on_resume(files, tmp_path, change, fragment):
    bad = rewrite(files / "gpt.pt", tmp_path / "last.pt", change)
    with pytest.raises(UserError, match=fragment):
        load_checkpoint(bad)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [{"model": Evil()}, Evil(), {"model": {"w": torch.zeros(1)}, "x": Evil()}])
def test_pickled_objects_are_refused_without_running_them(tmp_path, payload):
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="pickled Python object .*not loaded for safety"):
        load_file(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", pickle.dumps([1, 2, 3])])
def test_files_that_are_no_checkpoint(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="x.pt"):
        load_file(path)


def test_the_good_files_still_load(files):
    for kind in ("vq", "mar", "gpt"):
        load(kind, files / f"{kind}.pt")
    assert dataclasses.is_dataclass(load("gpt", files / "gpt.pt")[0].cfg)


def test_init_and_resume_refuse_non_finite_weights(files, tmp_path):
    mar = build_mar(preset_config("mar-tiny"))
    bad = rewrite(files / "mar.pt", tmp_path / "bad.pt",
                  lambda o: o["model"][first_float(o["model"])].view(-1).__setitem__(0, float("inf")))
    with pytest.raises(UserError, match="NaN or infinite"):
        init_from_checkpoint(mar, bad)
    bad = rewrite(files / "gpt.pt", tmp_path / "last.pt",
                  lambda o: o["model"][first_float(o["model"])].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(UserError, match="NaN or infinite"):
        load_checkpoint(bad)

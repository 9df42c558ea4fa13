"""Content identity of inputs (d2ctool/identity.py): every command that reuses or resumes work decides on the
sha256 of its inputs, never on their paths; a changed input is refused with both digests named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from conftest import run_d2c
from d2ctool import identity
from d2ctool.config import to_dict
from d2ctool.discrete.train import train_discrete
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml
from d2ctool.runstate import release_output
from d2ctool.sampling.run import sample
from d2ctool.tokenizers.encode import encode



def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_keeping_size_and_mtime(path, data: bytes) -> None:
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ------------------------------------------------------------------ the digest cache

def test_cached_digest_is_reused_but_never_trusted_on_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "CACHE_MIN_BYTES", 0)
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.pt"
    path.write_bytes(b"a" * 1000)
    calls = []
    real = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: calls.append(p) or real(p))
    assert identity.file_sha256(path) == sha(path) and len(calls) == 1
    assert identity.file_sha256(path) == sha(path) and len(calls) == 1  # from the cache
    rewrite_keeping_size_and_mtime(path, b"b" * 1000)  # same path, size and mtime; new bytes
    assert identity.file_sha256(path) == sha(path) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 2
    monkeypatch.setenv("D2C_DIGEST_CACHE", "0")
    identity.file_sha256(path)
    assert len(calls) == 3


def test_changed_inputs_names_each_input_and_both_digests():
    old = {"stage1": {"path": "/r/last.pt", "sha256": "a" * 64}, "vq": {"path": "/vq.pt", "sha256": "c" * 64}}
    new = {"stage1": {"path": "/r/last.pt", "sha256": "b" * 64}, "vq": {"path": "/vq.pt", "sha256": "c" * 64}}
    with pytest.raises(UserError) as e:
        identity.check_same_inputs(old, new, "OUT", "d2c sample")
    message = str(e.value)
    assert "stage1 (/r/last.pt)" in message and "b" * 16 in message and "a" * 16 in message
    assert "vq" not in message.split("inputs:")[1].split(".")[0] and "--force-restart" in message
    identity.check_same_inputs(old, dict(old), "OUT", "d2c sample")  # same digests: no error


# ------------------------------------------------------------------ sample

def _train_stage1(data, out, steps):
    recipe = load_recipe(None, [f"discrete.data={data}", f"discrete.out={out}", "discrete.model=gpt-tiny",
                                "discrete.sampling.top_k=0", "discrete.grid_classes=1", f"discrete.train.steps={steps}",
                                "discrete.train.global_batch_size=8", "discrete.train.num_workers=0",
                                "discrete.train.sample_every=0"])
    return train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))


def _sample_args(root, gpt):
    return [f"tokenizers.vq.checkpoint={root / 'vq-tiny-s4.pt'}", "sample.mode=discrete-only",
            f"sample.discrete={gpt}", "sample.num_images=10", "sample.batch_size=5", "sample.stage1.top_k=0",
            "sample.grid_classes=2", "sample.grid_per_class=2"]


def _sample(root, gpt, out, force=False, *extra):
    recipe = load_recipe(None, _sample_args(root, gpt) + list(extra), "sample")
    try:
        return sample(recipe.sample, recipe.tokenizers, out, recipe_yaml(recipe), force_restart=force)
    finally:
        release_output(out)  # a CLI run of the same folder follows in these tests


@pytest.mark.slow
def test_sample_refuses_a_stage1_model_trained_further_and_force_restart_resamples(tiny_data, tmp_path):
    """The issue's case: sample, train stage 1 on, sample again into the same folder."""
    gpt = tmp_path / "gpt"
    _train_stage1(tiny_data / "encoded", gpt, 2)
    out = tmp_path / "samples"
    _sample(tiny_data, gpt, out)
    first = json.loads((out / "manifest.json").read_text())["plan"]["inputs"]["stage1"]["sha256"]
    assert first == sha(gpt / "checkpoints" / "last.pt")
    assert _sample(tiny_data, gpt, out).already_complete  # same model: nothing to do
    _train_stage1(tiny_data / "encoded", gpt, 3)
    second = sha(gpt / "checkpoints" / "last.pt")
    assert second != first
    proc = run_d2c("sample", str(out), *[a for s in _sample_args(tiny_data, gpt) for a in ("--set", s)])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"stage1 ({gpt / 'checkpoints' / 'last.pt'})" in proc.stderr
    assert first[:16] in proc.stderr and second[:16] in proc.stderr and "--force-restart" in proc.stderr
    result = _sample(tiny_data, gpt, out, force=True)
    assert not result.already_complete and result.generated == 10
    assert json.loads((out / "manifest.json").read_text())["plan"]["inputs"]["stage1"]["sha256"] == second


@pytest.mark.slow
def test_sample_refuses_changed_real_images(tiny_data, tmp_path):
    data = tmp_path / "encoded"
    shutil.copytree(tiny_data / "encoded", data)
    args = [f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}", "sample.mode=vq-reconstruction",
            f"sample.oracle_data={data}", "sample.num_images=6", "sample.batch_size=6"]
    recipe = load_recipe(None, args, "sample")
    sample(recipe.sample, recipe.tokenizers, tmp_path / "out", recipe_yaml(recipe))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "note": "re-encoded"}))
    with pytest.raises(UserError, match=r"real_images \(.*encoded\) has sha256"):
        sample(recipe.sample, recipe.tokenizers, tmp_path / "out", recipe_yaml(recipe))


# ------------------------------------------------------------------ encode

@pytest.mark.slow
def test_encode_refuses_a_changed_tokenizer_and_restarts_when_forced(tiny_data, tmp_path):
    vq = tmp_path / "vq.pt"
    shutil.copy(tiny_data / "vq-tiny-s4.pt", vq)
    recipe = load_recipe(None, [f"tokenizers.vq.checkpoint={vq}", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}",
                                "encode.resolution=32"], "encode")
    out = tmp_path / "encoded"
    encode(tiny_data / "shards", out, recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    old = sha(vq)
    import torch

    state = torch.load(vq, weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, vq)
    with pytest.raises(UserError) as e:
        encode(tiny_data / "shards", out, recipe.tokenizers, recipe.encode, recipe_yaml(recipe))
    assert f"vq ({vq})" in str(e.value) and old[:16] in str(e.value) and sha(vq)[:16] in str(e.value)
    result = encode(tiny_data / "shards", out, recipe.tokenizers, recipe.encode, recipe_yaml(recipe),
                    force_restart=True)
    assert not result.already_complete
    assert json.loads((out / "manifest.json").read_text())["tokenizers"]["vq"]["sha256"] == sha(vq)


# ------------------------------------------------------------------ training data

@pytest.mark.slow
@pytest.mark.parametrize("command", ["train-discrete", "train-tokenizer"])
def test_training_resume_on_changed_data_is_refused_naming_the_data(tiny_data, tmp_path, command):
    data = tmp_path / ("encoded" if command == "train-discrete" else "shards")
    shutil.copytree(tiny_data / data.name, data)
    run = tmp_path / "run"
    common = ["train.global_batch_size=8", "train.num_workers=0", "train.sample_every=0"]
    if command == "train-discrete":
        args = ["train-discrete", *[f"--set=discrete.{s}" for s in
                                    [f"data={data}", f"out={run}", "model=gpt-tiny", "grid_classes=1", *common]]]
    else:
        args = ["train-tokenizer", "vq", str(data), str(run),
                *[f"--set=tokenizer_training.{s}" for s in ["vq_preset=vq-tiny-s4", "resolution=32", "val_images=4",
                                                            *common]]]
    first = run_d2c(*args, "--set=train.steps=1")
    assert first.returncode == 0, first.stderr
    old = sha(data / "manifest.json")
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "note": "changed"}))
    proc = run_d2c(*args, "--set=train.steps=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"data ({data})" in proc.stderr and old[:16] in proc.stderr
    assert sha(data / "manifest.json")[:16] in proc.stderr


# ------------------------------------------------------------------ fid, fid-ref, results

@pytest.mark.slow
def test_fid_scores_the_current_samples_not_a_cached_old_set(tiny_data, tmp_path, monkeypatch):
    """Same path, size and mtime, other pixels: the features (cached by content) and the metrics follow."""
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    ref = tmp_path / "ref.npz"
    fid = ["fid", str(npz), "--ref", str(tiny_data / "shards"), "--features", "inception-random", "--set",
           "fid.resolution=32"]
    assert run_d2c(*fid).returncode == 0
    first = json.loads((tmp_path / "metrics.json").read_text())
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))  # same shape: same size
    rewrite_keeping_size_and_mtime(npz, other.read_bytes())
    assert run_d2c(*fid).returncode == 0
    second = json.loads((tmp_path / "metrics.json").read_text())
    assert second["inputs"]["samples"]["sha256"] == sha(npz) != first["inputs"]["samples"]["sha256"]
    assert second["fid"] != first["fid"]
    assert not ref.exists()


@pytest.mark.slow
def test_results_refuses_a_row_whose_samples_changed_after_scoring(tiny_data, tmp_path):
    gpt = tmp_path / "gpt"
    _train_stage1(tiny_data / "encoded", gpt, 1)
    out = tmp_path / "samples"
    _sample(tiny_data, gpt, out)
    fid = ["fid", str(out), "--ref", str(tiny_data / "shards"), "--features", "inception-random", "--set",
           "fid.resolution=32", "--set", "fid.cache=false"]
    assert run_d2c(*fid).returncode == 0  # a sample folder is read as such; metrics.json goes inside it
    assert run_d2c("results", str(tmp_path / "table"), f"sys={out}").returncode == 0
    _sample(tiny_data, gpt, out, True, "sample.seed=1")  # new samples; metrics.json is the old one
    proc = run_d2c("results", str(tmp_path / "table2"), f"sys={out}")
    assert proc.returncode == 2 and "row sys" in proc.stderr and "re-run `d2c fid" in proc.stderr
    assert sha(out / "samples.npz")[:16] in proc.stderr


@pytest.mark.slow
def test_fid_ref_records_the_content_of_its_source(tiny_data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_data / "shards", shards)
    args = ["fid-ref", str(shards), str(tmp_path / "ref.npz"), "--features", "inception-random", "--resolution",
            "32", "--num-images", "8", "--set", "fid.cache=false"]
    assert run_d2c(*args).returncode == 0
    with np.load(tmp_path / "ref.npz") as f:
        meta = json.loads(str(f["d2c_meta"]))
    assert meta["inputs"]["images"]["sha256"] == meta["source"]["content_sha256"]

"""Class 1: OS faults (full disk, read-only or vanished folder) are one-line errors naming the path and the
fault, after which earlier outputs are intact and no partial file is left under a final name.

Faults are injected in-process with monkeypatch at the write boundary (CI runs as root, where chmod does not
stop writes, and mounting a read-only or tiny tmpfs needs privileges CI may not grant)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

import d2ctool.data.prepare as prepare_module
from d2ctool.io import TMP_SUFFIX

from faults import assert_one_line_error, read_only, run_cli

PREPARE = ["prepare", "synthetic", None, "--set", "synthetic.images_per_class=3", "--set", "synthetic.num_classes=2",
           "--set", "synthetic.resolution=16", "--set", "shard_size=2", "--workers", "1"]


def prepare_args(out):
    return [out if a is None else a for a in PREPARE]


def fail_on_shard(monkeypatch, index: int, fault):
    """Make the `index`-th shard write (0-based) call `fault(path)`; earlier shards are written normally."""
    real, calls = prepare_module.write_tar, []

    def write_tar(path, samples):
        calls.append(path)
        if len(calls) == index + 1:
            fault(path)
        return real(path, samples)

    monkeypatch.setattr(prepare_module, "write_tar", write_tar)


def temporaries(folder):
    return [p for p in folder.rglob(f"*{TMP_SUFFIX}")] if folder.exists() else []


@pytest.mark.slow
def test_full_disk_mid_run_is_one_line_and_keeps_earlier_shards(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def enospc(path):
        with open(path, "wb") as f:  # a partial temporary, as a real full disk leaves
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    fail_on_shard(monkeypatch, 1, enospc)
    code, err = run_cli(monkeypatch, capsys, *prepare_args(out))
    assert code == 1
    assert_one_line_error(code, err, "No space left on device", "ENOSPC", "free space")
    assert "images-000000.tar" not in err and ".tmp" in err  # names the file that failed
    assert (out / "images-000000.tar").is_file()  # the earlier shard is intact
    assert not (out / "manifest.json").exists()
    assert temporaries(out) == []  # the partial temporary was removed
    monkeypatch.undo()
    code, err = run_cli(monkeypatch, capsys, *prepare_args(out))  # disk freed: the re-run resumes
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and len(manifest["shards"]) == 3


@pytest.mark.slow
def test_output_folder_deleted_mid_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fail_on_shard(monkeypatch, 1, lambda path: shutil.rmtree(out))
    code, err = run_cli(monkeypatch, capsys, *prepare_args(out))
    assert_one_line_error(code, err, str(out), "No such file or directory", "deleted or moved")


@pytest.mark.slow
@pytest.mark.parametrize("code_, words", [(errno.EROFS, "Read-only file system (EROFS)"),
                                          (errno.EACCES, "Permission denied (EACCES)")])
def test_unwritable_output_fails_before_any_work(tmp_path, monkeypatch, capsys, code_, words):
    out = tmp_path / "ro" / "out"
    out.parent.mkdir()
    read_only(monkeypatch, out.parent, code_)
    started = []
    monkeypatch.setattr(prepare_module, "_load_in_parallel", lambda *a, **k: started.append(1) or iter(()))
    code, err = run_cli(monkeypatch, capsys, *prepare_args(out))
    assert_one_line_error(code, err, f"cannot write output to {out}", words)
    assert started == []  # no image was read


@pytest.mark.slow
def test_fid_checks_the_output_is_writable_before_extracting_features(tiny_data, tmp_path, monkeypatch, capsys):
    import d2ctool.evaluation.fid as fid_module

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000000.png").write_bytes((tiny_data / "shards" / "manifest.json").read_bytes())  # never read
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    extracted = []
    monkeypatch.setattr(fid_module, "extract_features", lambda *a, **k: extracted.append(1))
    monkeypatch.setattr(fid_module, "open_images", lambda *a, **k: extracted.append("opened"))
    code, err = run_cli(monkeypatch, capsys, "fid", samples, "--ref", tiny_data / "shards", "--out",
                        ro / "metrics.json", "--features", "inception-random")
    assert_one_line_error(code, err, str(ro), "Read-only file system")
    assert extracted == []


@pytest.mark.slow
def test_training_run_folder_must_be_writable_before_the_model_is_built(tiny_data, tmp_path, monkeypatch, capsys):
    import d2ctool.discrete.train as train_module

    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    built = []
    monkeypatch.setattr(train_module.DiscreteTask, "build_model", lambda self: built.append(1))
    code, err = run_cli(monkeypatch, capsys, "train-discrete", "--set", f"discrete.data={tiny_data / 'encoded'}",
                        "--set", f"discrete.out={ro / 'run'}", "--set", "discrete.model=gpt-tiny")
    assert_one_line_error(code, err, str(ro / "run"), "Read-only file system")
    assert built == []


@pytest.mark.slow
def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tiny_data, tmp_path, monkeypatch, capsys):
    import torch

    run = tmp_path / "run"
    args = ["train-discrete", "--set", f"discrete.data={tiny_data / 'encoded'}", "--set", f"discrete.out={run}",
            "--set", "discrete.model=gpt-tiny", "--set", "train.global_batch_size=8", "--set", "train.steps=2",
            "--set", "train.ckpt_every=1", "--set", "train.num_workers=0", "--set", "train.sample_every=0"]
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the checkpoint of step 2
            with open(f, "wb") as out:
                out.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "No space left on device", "step_0000002.pt")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000001.pt"]  # no partial file
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 2

"""Class 9: OS faults name the path, and a finished run is a no-op anywhere. A full disk while `encode` writes a
shard names that shard; re-running a finished prepare, encode or training run whose output sits on a read-only mount
is "nothing to do" (exit 0), while an unfinished one still fails at once."""

from __future__ import annotations

import errno
import json
import os

import d2ctool.tokenizers.encode as encode_module

from faults import assert_one_line_error, copy_folder, read_only, run_cli

PREPARE = ["prepare", "synthetic", None, "--set", "synthetic.images_per_class=3", "--set", "synthetic.num_classes=2",
           "--set", "synthetic.resolution=16", "--set", "shard_size=2", "--workers", "1"]


def encode_args(tiny_data, out):
    return ["encode", tiny_data / "shards", out, "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
            "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set", "encode.resolution=32"]


def test_a_full_disk_during_encode_names_the_shard_being_written(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "enc"
    real = encode_module.write_tar

    def full(path, samples):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as tarfile raises it: no file name

    monkeypatch.setattr(encode_module, "write_tar", full)
    code, err = run_cli(monkeypatch, capsys, *encode_args(tiny_data, out))
    line = assert_one_line_error(code, err, "No space left on device", "ENOSPC", "free space")
    first = json.loads((tiny_data / "shards" / "manifest.json").read_text())["shards"][0]["file"]
    assert str(out / first) in line
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(encode_module, "write_tar", real)
    code, err = run_cli(monkeypatch, capsys, *encode_args(tiny_data, out))
    assert code == 0, err


def test_finished_prepare_on_a_read_only_mount_is_nothing_to_do(tmp_path, monkeypatch, capsys):
    out = tmp_path / "mnt" / "shards"
    args = [out if a is None else a for a in PREPARE]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    read_only(monkeypatch, tmp_path / "mnt")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    changed = [a if a != "shard_size=2" else "shard_size=3" for a in args]  # not this finished run: refused
    code, err = run_cli(monkeypatch, capsys, *changed)
    assert_one_line_error(code, err, str(out))


def test_finished_encode_on_a_read_only_mount_is_nothing_to_do(tiny_data, tmp_path, monkeypatch, capsys):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = copy_folder(tiny_data / "encoded", mnt / "encoded")
    read_only(monkeypatch, mnt)
    code, err = run_cli(monkeypatch, capsys, *encode_args(tiny_data, out))
    assert code == 0, err


def test_a_finished_training_run_on_a_read_only_mount_is_nothing_to_do(tiny_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "mnt" / "run"
    args = ["train-discrete", "--set", f"discrete.data={tiny_data / 'encoded'}", "--set", f"discrete.out={run}",
            "--set", "discrete.model=gpt-tiny", "--set", "train.global_batch_size=8", "--set", "train.steps=1",
            "--set", "train.num_workers=0", "--set", "train.sample_every=0"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    read_only(monkeypatch, tmp_path / "mnt")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "nothing to do" in err
    more = [a if a != "train.steps=1" else "train.steps=2" for a in args]  # unfinished: the mount is a real error
    code, err = run_cli(monkeypatch, capsys, *more)
    assert_one_line_error(code, err, str(run), "Read-only file system")

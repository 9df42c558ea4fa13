"""Class 2: shards are verified, not trusted. Each test plants one fault in its own copy of the tiny shards."""

from __future__ import annotations

import json
import re
import tarfile

import pytest

from d2ctool.data.reader import ShardReader
from d2ctool.data.shards import iter_tar, load_manifest, write_tar
from d2ctool.data.torch_dataset import decode_rgb
from d2ctool.errors import UserError
from d2ctool.io import sha256_file

from faults import assert_one_line_error, rewrite_manifest, run_cli, image_shards  # noqa: F401 (a fixture)


def first_shard(folder):
    entry = json.loads((folder / "manifest.json").read_text())["shards"][0]
    return folder / entry["file"], entry


def encode_args(tiny_data, shards, out):
    return ["encode", shards, out, "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
            "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set", "encode.resolution=32"]


def cut_at_block_boundary(path) -> int:
    """Drop the last sample's members, cutting the file at a 512-byte boundary: still a valid tar."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.partition(".")[0]
    cut = min(m.offset for m in members if m.name.partition(".")[0] == last_key)
    assert cut % 512 == 0
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    with tarfile.open(path) as tar:  # what made this fault silent: tarfile reads it as a shorter archive
        assert len(tar.getmembers()) < len(members)
    return len(data)


@pytest.mark.slow
def test_a_shard_cut_at_a_block_boundary_is_caught_by_its_size(image_shards, tiny_data, tmp_path, monkeypatch, capsys):
    path, _ = first_shard(image_shards)
    cut_at_block_boundary(path)
    with pytest.raises(UserError, match=rf"shard .*{path.name}: \d+ bytes, the manifest says \d+ .*d2c prepare"):
        ShardReader(image_shards)
    code, err = run_cli(monkeypatch, capsys, *encode_args(tiny_data, image_shards, tmp_path / "enc"))
    assert_one_line_error(code, err, path.name, "bytes, the manifest says", "re-run `d2c prepare`")
    assert not (tmp_path / "enc" / "manifest.json").exists()


@pytest.mark.slow
def test_without_a_size_the_sample_count_still_catches_the_cut(image_shards):
    path, entry = first_shard(image_shards)
    cut_at_block_boundary(path)
    rewrite_manifest(image_shards, lambda m: m["shards"][0].pop("bytes"))
    reader = ShardReader(image_shards)
    with pytest.raises(UserError, match=rf"{path.name}: holds {entry['samples'] - 1} samples, its manifest says "
                                        rf"at least {entry['samples']}"):
        list(reader.raw())


@pytest.mark.slow
def test_sha256_is_checked_on_verify_and_in_encodes_first_read(image_shards, tiny_data, tmp_path, monkeypatch, capsys):
    path, _ = first_shard(image_shards)
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes (inside the first image's data)
    path.write_bytes(bytes(data))
    load_manifest(image_shards)  # size matches: opening does not read every byte
    with pytest.raises(UserError, match="sha256 differs"):
        load_manifest(image_shards, verify=True)
    code, err = run_cli(monkeypatch, capsys, *encode_args(tiny_data, image_shards, tmp_path / "enc"))
    assert_one_line_error(code, err, path.name, "sha256 differs", "re-run `d2c prepare`")
    code, err = run_cli(monkeypatch, capsys, "train-tokenizer", "vq", image_shards, tmp_path / "tok", "--verify")
    assert_one_line_error(code, err, path.name, "sha256 differs")


@pytest.mark.slow
def test_a_cut_inside_a_member_names_shard_and_sample(image_shards):
    path, _ = first_shard(image_shards)
    path.write_bytes(path.read_bytes()[:1500])  # inside the first image
    rewrite_manifest(image_shards, lambda m: m["shards"][0].pop("bytes"))
    with pytest.raises(UserError, match=rf"shard .*{path.name}: damaged tar, in sample '\w+'"):
        list(ShardReader(image_shards).raw())


def replace_member(path, key_index: int, ext: str, data: bytes) -> str:
    samples = list(iter_tar(path))
    key, members = samples[key_index]
    members[ext] = data
    write_tar(path, samples)
    return key


@pytest.mark.slow
def test_a_member_that_is_not_an_image_names_shard_and_key(image_shards):
    path, _ = first_shard(image_shards)
    key = replace_member(path, 1, "png", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    rewrite_manifest(image_shards, lambda m: m["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path)))
    reader = ShardReader(image_shards)
    with pytest.raises(UserError, match=rf"shard .*{path.name}, sample '{key}': the image member is not a decodable"):
        for key_, members in reader.raw():
            decode_rgb(members, None)
    with pytest.raises(UserError, match=rf"sample '{key}': the image member is not a decodable"):
        list(ShardReader(image_shards))


@pytest.mark.slow
@pytest.mark.parametrize("manifest, problem", [
    ("[1, 2, 3]", "expected a JSON object, got list"),
    ('{"format": "d2c-image-shards", "classes": []}', "no valid 'shards' list"),
    ('{"format": "d2c-image-shards", "classes": [], "shards": [{"file": "x.tar"}]}', "no valid 'shards' list"),
    ("{not json", "not valid JSON"),
    ('{"format": "d2c-image-shards", "shards": []}', "incomplete manifest (missing or invalid: classes, class_counts)"),
    ('"\\u0000', "not valid JSON"),
])
def test_a_bad_manifest_is_one_line(image_shards, manifest, problem, tmp_path, monkeypatch, capsys):
    (image_shards / "manifest.json").write_text(manifest)
    with pytest.raises(UserError, match=re.escape(problem)):
        load_manifest(image_shards)
    code, err = run_cli(monkeypatch, capsys, "train-tokenizer", "vq", image_shards, tmp_path / "tok")
    assert_one_line_error(code, err, "manifest.json", problem)


@pytest.mark.slow
def test_the_workers_index_catches_the_cut_too(image_shards):
    """DataLoader workers read through a tar-header index, not the sequential reader: same check, same line."""
    from d2ctool.data.torch_dataset import ShardDataset, decode_rgb

    path, entry = first_shard(image_shards)
    cut_at_block_boundary(path)
    rewrite_manifest(image_shards, lambda m: m["shards"][0].pop("bytes"))
    with pytest.raises(UserError, match=rf"{path.name}: holds {entry['samples'] - 1} samples, its manifest says "
                                        rf"{entry['samples']}; the file is truncated"):
        ShardDataset(ShardReader(image_shards), decode_rgb, batch_size=2)

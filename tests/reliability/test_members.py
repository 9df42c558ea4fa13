"""Class 3: every .npy member of an encoded shard is validated before it reaches a model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from d2ctool.data.encoded import FORMAT as ENCODED
from d2ctool.data.reader import ShardReader
from d2ctool.data.shards import iter_tar, npy_bytes, write_tar
from d2ctool.errors import UserError
from d2ctool.io import sha256_file

from faults import assert_one_line_error, rewrite_manifest, run_cli, encoded_shards  # noqa: F401 (a fixture)



def plant(folder, member: str, make) -> str:
    """Replace `member` of the 3rd sample of the first shard with make(original array); keep the manifest
    consistent (size, sha256) so only member validation can catch it. Returns the sample's key."""
    manifest = json.loads((folder / "manifest.json").read_text())
    path = folder / manifest["shards"][0]["file"]
    samples = list(iter_tar(path))
    key, members = samples[2]
    members[member] = make(np.load(io.BytesIO(members[member])))
    write_tar(path, samples)
    rewrite_manifest(folder, lambda m: m["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path)))
    return key


def object_array(a):
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def nan_moments(a):
    a = a.copy()
    a[0, 0, 0, 0] = np.nan
    return npy_bytes(a)


CASES = {
    "garbage bytes": ("codes.npy", lambda a: b"\x93NUMPY garbage" * 3, "not a readable .npy array"),
    "cut header": ("moments.npy", lambda a: npy_bytes(a)[:40], "not a readable .npy array"),
    "pickled object array": ("codes.npy", object_array, "not a readable .npy array"),
    "float codes": ("codes.npy", lambda a: npy_bytes(a.astype(np.float32)), "dtype float32, expected integer"),
    "integer moments": ("moments.npy", lambda a: npy_bytes(a.astype(np.int32)), "dtype int32, expected floating"),
    "wrong code grid": ("codes.npy", lambda a: npy_bytes(a[:, :-1]), "shape [2, 63], the manifest says [2, 64]"),
    "wrong channels": ("moments.npy", lambda a: npy_bytes(a[:, :-2]), "the manifest says [2, "),
    "NaN moments": ("moments.npy", nan_moments, "NaN or infinite"),
    "code past the codebook": ("codes.npy", lambda a: npy_bytes(np.full_like(a, 512)), "code 512 outside the codebook (0..511)"),
    "negative code": ("codes.npy", lambda a: npy_bytes(np.full_like(a, -3)), "code -3 outside the codebook"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_member_names_shard_key_and_member(encoded_shards, case):
    member, make, problem = CASES[case]
    key = plant(encoded_shards, member, make)
    reader = ShardReader(encoded_shards, 0, 1, manifest_kind=ENCODED)
    with pytest.raises(UserError) as caught:
        list(reader.raw())
    message = str(caught.value)
    assert f"sample '{key}'" in message and "-000000.tar" in message and problem in message, message
    assert f"member {member}" in message


@pytest.mark.slow
def test_a_bad_label_is_caught_too(encoded_shards):
    manifest = json.loads((encoded_shards / "manifest.json").read_text())
    path = encoded_shards / manifest["shards"][0]["file"]
    samples = list(iter_tar(path))
    samples[0][1]["cls"] = b"999"
    write_tar(path, samples)
    rewrite_manifest(encoded_shards, lambda m: m["shards"][0].update(bytes=path.stat().st_size, sha256=sha256_file(path)))
    with pytest.raises(UserError, match=r"sample '\w+': class label 999 outside 0\.\.9"):
        list(ShardReader(encoded_shards, 0, 1, manifest_kind=ENCODED).raw())


@pytest.mark.slow
def test_inside_a_dataloader_worker_it_is_still_one_line(encoded_shards, tmp_path, monkeypatch, capsys):
    """The error crosses the worker process boundary (torch re-raises it with the worker's traceback in its
    message); the CLI prints only our line."""
    plant(encoded_shards, "codes.npy", lambda a: npy_bytes(np.full_like(a, 600)))
    code, err = run_cli(monkeypatch, capsys, "train-discrete", "--set", f"discrete.data={encoded_shards}",
                        "--set", f"discrete.out={tmp_path / 'run'}", "--set", "discrete.model=gpt-tiny",
                        "--set", "train.global_batch_size=8", "--set", "train.steps=2", "--set", "train.num_workers=1",
                        "--set", "train.sample_every=0")
    line = assert_one_line_error(code, err, "codes.npy", "code 600 outside the codebook")
    assert code == 2 and "DataLoader" not in line
